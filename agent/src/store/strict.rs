//! Strict decoding: a field the type does not know is an error, as with `kubectl apply
//! --validate=strict` (k8s-openapi itself ignores unknown fields, as the API server's lenient
//! decoding does). Found by decoding into the type and encoding again.
use serde_json::Value;

/// The dotted paths of fields present in `original` but lost in `round_trip` (the same object
/// decoded into its type and encoded again): fields the type does not know. `null` values are
/// ignored (they mean "absent").
pub fn unknown_fields(original: &Value, round_trip: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(original, round_trip, &mut String::new(), &mut out);
    out
}

fn walk(original: &Value, round_trip: &Value, path: &mut String, out: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(o), Value::Object(r)) => {
            for (key, value) in o {
                if value.is_null() {
                    continue;
                }
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                match r.get(key) {
                    Some(rv) => walk(value, rv, path, out),
                    None => out.push(path.clone()),
                }
                path.truncate(len);
            }
        }
        (Value::Array(o), Value::Array(r)) => {
            for (i, (ov, rv)) in o.iter().zip(r).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(ov, rv, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn finds_unknown_fields_at_any_depth() {
        let original = json!({
            "spec": {"ports": [{"port": 80, "prot": "TCP"}], "typo": 1, "nothing": null},
            "metadata": {"name": "a"}
        });
        let round_trip = json!({"spec": {"ports": [{"port": 80}]}, "metadata": {"name": "a"}});
        assert_eq!(
            unknown_fields(&original, &round_trip),
            vec!["spec.ports[0].prot", "spec.typo"]
        );
    }
}
