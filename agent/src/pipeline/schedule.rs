//! When the next pass runs: changes are debounced (editors, atomic writers and rollouts
//! produce bursts), but never delayed past a bound; API changes are also spaced so a churning
//! cluster costs at most a few passes a second. Pure: the caller passes the time.
use std::time::{Duration, Instant};

/// A change in the source directory is applied once it has been quiet this long...
pub const DEBOUNCE: Duration = Duration::from_millis(20);
/// ...but never later than this after the first change.
pub const DEBOUNCE_MAX: Duration = Duration::from_millis(60);
/// A file closed after writing or renamed into place is complete: applied after this much
/// quiet only (what else the same tool writes at once usually follows within it).
pub const DEBOUNCE_COMPLETE: Duration = Duration::from_millis(3);
/// Changes from the API server are applied after 50 ms of quiet, 250 ms after the first
/// change at the latest, and never sooner than 250 ms after the previous pass (a pass compiles
/// the whole store: 4 passes a second at most).
pub const DEBOUNCE_API: Duration = Duration::from_millis(50);
pub const DEBOUNCE_API_MAX: Duration = Duration::from_millis(250);

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Files closed after writing, or renamed into place: complete as they are now.
    Complete,
    /// Anything else in the directory: a file may be in the middle of a write.
    Changed,
    /// A reflector applied a change from the API server.
    Api,
}

/// The pending pass, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// (apply at the latest, apply once quiet until) while changes are pending.
    pending: Option<(Instant, Instant)>,
    /// API changes are not applied before this.
    api_not_before: Instant,
}

impl Schedule {
    pub fn new(now: Instant) -> Self {
        Self {
            pending: None,
            api_not_before: now,
        }
    }

    /// Notes a change seen at `now`. The bound set by the first pending change stays.
    pub fn on_change(&mut self, change: Change, now: Instant) {
        let (quiet, max) = match change {
            // Soon, even when other files changed too: one still being written is left for a
            // later pass, until it settles.
            Change::Complete => (now + DEBOUNCE_COMPLETE, now + DEBOUNCE_MAX),
            Change::Changed => (now + DEBOUNCE, now + DEBOUNCE_MAX),
            Change::Api => (
                (now + DEBOUNCE_API).max(self.api_not_before),
                (now + DEBOUNCE_API_MAX).max(self.api_not_before),
            ),
        };
        let latest = self.pending.map_or(max, |(latest, _)| latest);
        self.pending = Some((latest, quiet));
    }

    /// When the pending pass is due (None: nothing pending).
    pub fn due(&self) -> Option<Instant> {
        self.pending.map(|(latest, quiet)| quiet.min(latest))
    }

    /// A pass starts at `now`: nothing is pending, and API changes wait for the spacing.
    pub fn pass_started(&mut self, now: Instant) {
        self.pending = None;
        self.api_not_before = now + DEBOUNCE_API_MAX;
    }

    /// A file was still being written during the pass: read it again after the debounce.
    pub fn retry_unsettled(&mut self, now: Instant) {
        self.pending = Some((now + DEBOUNCE_MAX, now + DEBOUNCE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn nothing_is_due_without_a_change() {
        assert_eq!(Schedule::new(Instant::now()).due(), None);
    }

    #[test]
    fn a_change_is_applied_once_quiet() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        s.on_change(Change::Changed, t0);
        assert_eq!(s.due(), Some(t0 + DEBOUNCE));
    }

    #[test]
    fn a_burst_of_changes_is_applied_no_later_than_the_bound_from_its_first() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        for i in 0..10 {
            s.on_change(Change::Changed, t0 + 10 * i * MS);
        }
        assert_eq!(s.due(), Some(t0 + DEBOUNCE_MAX));
    }

    #[test]
    fn a_completed_file_is_applied_after_a_short_quiet() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        s.on_change(Change::Changed, t0);
        s.on_change(Change::Complete, t0 + MS);
        assert_eq!(s.due(), Some(t0 + MS + DEBOUNCE_COMPLETE));
    }

    #[test]
    fn api_changes_wait_for_the_spacing_after_a_pass() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        s.pass_started(t0);
        assert_eq!(s.due(), None);
        s.on_change(Change::Api, t0 + MS);
        assert_eq!(s.due(), Some(t0 + DEBOUNCE_API_MAX));
    }

    #[test]
    fn api_changes_without_a_recent_pass_wait_only_for_quiet() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        s.on_change(Change::Api, t0 + MS);
        assert_eq!(s.due(), Some(t0 + MS + DEBOUNCE_API));
    }

    #[test]
    fn an_unsettled_file_is_read_again_after_the_debounce() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        s.pass_started(t0);
        s.retry_unsettled(t0);
        assert_eq!(s.due(), Some(t0 + DEBOUNCE));
    }
}
