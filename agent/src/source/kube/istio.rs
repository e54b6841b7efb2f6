//! Istio's APIs (`security.istio.io`, and `networking.istio.io`'s DestinationRules) from
//! the API server: their CRDs may not be installed, so each group is looked for first (API
//! discovery), and again every `--crd-discovery-interval` until every kind is served; each
//! kind found gets a reflector of its own, under the same ready and fail-static rules as the
//! others.
//!
//! - The first version a group lists is read when the server serves it (v1, else v1beta1
//!   for Istio before 1.22, else v1alpha3 for DestinationRules).
//! - Until discovery has answered once, the source is not listed: a pass must not compile a
//!   store without the security policies a cluster has (it would lift them).
//! - A kind not served is empty, as for a cluster without Istio; a kind served whose objects
//!   cannot be listed (RBAC, errors) keeps the source from being ready, as any other kind.
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::reflector::{Store as Reader, store::Writer},
};

use super::watch::{self, Health};
use crate::store::{self, FieldError, Kind, Object};

pub use super::watch::{OPTIONAL, optional_kinds};

/// One kind's reflector, and the apiVersion its objects are read as.
#[derive(Debug, Clone)]
pub struct Watched {
    pub kind: Kind,
    pub api_version: String,
    pub reader: Reader<DynamicObject>,
}

/// The reflectors discovery has started so far.
pub type Readers = Arc<Mutex<Vec<Watched>>>;

/// The optional kinds the server serves, each at the first version of its group that
/// serves it. Empty when no group is served (no CRDs).
async fn discover(client: &Client) -> Result<Vec<(Kind, ApiResource)>, kube::Error> {
    let mut found: Vec<(Kind, ApiResource)> = Vec::new();
    for g in &OPTIONAL {
        for version in g.versions {
            let list = match client
                .list_api_group_resources(&format!("{}/{version}", g.group))
                .await
            {
                Ok(list) => list,
                Err(kube::Error::Api(s)) if s.code == 404 => continue,
                Err(e) if g.required => return Err(e),
                Err(e) => {
                    tracing::warn!(target: "weft::source", group = g.group, error = %crate::chain(&e), "API discovery of this group failed; trying again at the next discovery");
                    break;
                }
            };
            for &(kind, plural) in g.kinds {
                let served = list.resources.iter().any(|r| r.name == plural);
                if served && !found.iter().any(|(k, _)| *k == kind) {
                    let gvk = GroupVersionKind::gvk(g.group, version, kind.as_str());
                    found.push((kind, ApiResource::from_gvk_with_plural(&gvk, plural)));
                }
            }
        }
    }
    Ok(found)
}

/// Looks for the groups until every kind is watched, starting a reflector for each kind as
/// it appears. Ends only when every kind is.
pub async fn discovery(client: Client, health: Arc<Health>, readers: Readers, every: Duration) {
    let mut started: Vec<Kind> = Vec::new();
    // Dropped with this task (the source is): the reflectors end with it.
    let mut tasks = tokio::task::JoinSet::new();
    // Failures back off as the watches do (0.8 s doubling to 30 s).
    let mut retry = watch::BACKOFF_FIRST;
    loop {
        let found = match discover(&client).await {
            Ok(found) => found,
            Err(e) => {
                health.discovery_failed(&e);
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(watch::BACKOFF_MAX);
                continue;
            }
        };
        retry = watch::BACKOFF_FIRST;
        for (kind, ar) in found {
            if started.contains(&kind) {
                continue;
            }
            tracing::info!(target: "weft::source", kind = %kind, api_version = ar.api_version, "served by the API server; watching it");
            health.expect(kind);
            let writer = Writer::new(ar.clone());
            let reader = writer.as_reader();
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            tasks.spawn(watch::watch(api, writer, kind, Arc::clone(&health)));
            readers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Watched {
                    kind,
                    api_version: ar.api_version,
                    reader,
                });
            started.push(kind);
        }
        health.discovered(&started);
        if started.len() == optional_kinds().count() {
            // The reflectors run as long as this task: it waits for them.
            while tasks.join_next().await.is_some() {}
            return;
        }
        tokio::time::sleep(every).await;
    }
}

/// An object of an optional kind as the store holds it, decoded and validated as a document of the
/// directory source is: `Err` with what is wrong and what stands in for it.
pub fn decode(
    w: &Watched,
    object: &DynamicObject,
) -> Result<Object, (Vec<FieldError>, Option<Object>)> {
    let mut value = serde_json::to_value(object).map_err(|e| {
        let error = FieldError {
            field: String::new(),
            message: format!("cannot re-encode: {e}"),
        };
        (vec![error], None)
    })?;
    // List items may come without their type.
    if let Some(map) = value.as_object_mut() {
        map.entry("apiVersion")
            .or_insert_with(|| w.api_version.clone().into());
        map.entry("kind").or_insert_with(|| w.kind.as_str().into());
    }
    store::decode(value)
        .map(|(_, object)| object)
        .map_err(|invalid| (invalid.errors, invalid.stand_in))
}
