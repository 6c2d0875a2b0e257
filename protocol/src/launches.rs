//! Launch-id idempotency on the agent: the same launch delivered twice runs once, and the
//! second delivery is answered with the state of the first.
//!
//! Pure bookkeeping over launch ids and run ids; the agent persists the same facts in each
//! run directory (`launch.json`) and rebuilds this table from them after a restart.

use std::collections::HashMap;

use crate::frame::{Launch, LaunchState, LaunchStatus};
use crate::ids::{LaunchId, RunId};

/// What to do with an offered launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// New: start it.
    Start,
    /// Seen before: do not run it again; answer with this state.
    Duplicate(LaunchState),
    /// Refuse it, with the reason.
    Conflict(String),
}

#[derive(Debug, Clone)]
struct Entry {
    run_id: RunId,
    launch: Launch,
    finished: Option<LaunchStatus>,
    last_seq: u64,
}

/// Every launch this agent has accepted.
#[derive(Debug, Default)]
pub struct LaunchTable {
    by_launch: HashMap<LaunchId, Entry>,
    by_run: HashMap<RunId, LaunchId>,
}

impl LaunchTable {
    /// Decides about `launch` and, when it is new, records it.
    pub fn offer(&mut self, launch: &Launch) -> Offer {
        if let Some(entry) = self.by_launch.get(&launch.launch_id) {
            if entry.launch != *launch {
                return Offer::Conflict(format!(
                    "launch {} was already accepted with a different spec",
                    launch.launch_id
                ));
            }
            let state = match entry.finished {
                Some(status) => LaunchState::Finished {
                    status,
                    last_seq: entry.last_seq,
                },
                None => LaunchState::Running {
                    last_seq: entry.last_seq,
                },
            };
            return Offer::Duplicate(state);
        }
        if let Some(other) = self.by_run.get(&launch.run_id) {
            return Offer::Conflict(format!(
                "run id {} is already used by launch {other}",
                launch.run_id
            ));
        }
        self.insert(launch.clone(), None, 0);
        Offer::Start
    }

    /// Records a launch known from disk (after a restart).
    pub fn insert(&mut self, launch: Launch, finished: Option<LaunchStatus>, last_seq: u64) {
        self.by_run
            .insert(launch.run_id.clone(), launch.launch_id.clone());
        self.by_launch.insert(
            launch.launch_id.clone(),
            Entry {
                run_id: launch.run_id.clone(),
                launch,
                finished,
                last_seq,
            },
        );
    }

    /// Notes the last event seq written for a launch.
    pub fn progressed(&mut self, launch_id: &LaunchId, last_seq: u64) {
        if let Some(entry) = self.by_launch.get_mut(launch_id) {
            entry.last_seq = last_seq;
        }
    }

    /// Notes that a launch finished.
    pub fn finished(&mut self, launch_id: &LaunchId, status: LaunchStatus) {
        if let Some(entry) = self.by_launch.get_mut(launch_id) {
            entry.finished = Some(status);
        }
    }

    /// The run id of a known launch.
    pub fn run_of(&self, launch_id: &LaunchId) -> Option<&RunId> {
        self.by_launch.get(launch_id).map(|e| &e.run_id)
    }

    /// Whether a known launch is still running.
    pub fn is_running(&self, launch_id: &LaunchId) -> bool {
        self.by_launch
            .get(launch_id)
            .is_some_and(|e| e.finished.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{LaunchSpec, ProbeSpec};

    fn launch(id: &str, run: &str, lines: u32) -> Launch {
        Launch {
            launch_id: LaunchId::new(id).unwrap(),
            run_id: RunId::new(run).unwrap(),
            deadline_unix_ms: 10,
            spec: LaunchSpec::Probe(ProbeSpec { echo_lines: lines }),
        }
    }

    #[test]
    fn second_delivery_gets_the_state_of_the_first() {
        let mut table = LaunchTable::default();
        let a = launch("a", "run-a", 1);
        assert_eq!(table.offer(&a), Offer::Start);
        table.progressed(&a.launch_id, 4);
        assert_eq!(
            table.offer(&a),
            Offer::Duplicate(LaunchState::Running { last_seq: 4 })
        );
        table.finished(&a.launch_id, LaunchStatus::Succeeded);
        assert_eq!(
            table.offer(&a),
            Offer::Duplicate(LaunchState::Finished {
                status: LaunchStatus::Succeeded,
                last_seq: 4
            })
        );
    }

    #[test]
    fn reused_ids_with_other_content_conflict() {
        let mut table = LaunchTable::default();
        assert_eq!(table.offer(&launch("a", "run-a", 1)), Offer::Start);
        let Offer::Conflict(why) = table.offer(&launch("a", "run-a", 2)) else {
            panic!("expected conflict")
        };
        assert!(why.contains("different spec"), "{why}");
        let Offer::Conflict(why) = table.offer(&launch("b", "run-a", 1)) else {
            panic!("expected conflict")
        };
        assert!(
            why.contains("run id run-a is already used by launch a"),
            "{why}"
        );
    }
}
