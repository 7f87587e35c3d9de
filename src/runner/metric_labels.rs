//! [`MetricLabels`]: the `context` and `route` labels of a service's metrics, checked at
//! start-up so that no two pools or routes write to the same series.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};

/// The labels given so far.
#[derive(Debug, Default)]
pub(super) struct MetricLabels {
    contexts: BTreeSet<String>,
    /// (context label, route label) → the route's name.
    routes: BTreeMap<(String, String), String>,
}

impl MetricLabels {
    /// Take the label of a context that has routes: not blank, and no other context's.
    pub(super) fn add_context(&mut self, label: &str) -> Result<()> {
        if label.trim().is_empty() {
            return Err(Error::Startup(
                "a RunnerContext has an empty metric_label: give it a name, or none for the \
                 default"
                    .into(),
            ));
        }
        if !self.contexts.insert(label.to_owned()) {
            return Err(Error::Startup(format!(
                "two RunnerContexts have the metric_label '{label}': their pools would share \
                 the series of available_workers and service_info; give each its own"
            )));
        }
        Ok(())
    }

    /// Take the label of route `name` in the context labelled `context`: not blank, and no
    /// other route's in that context.
    pub(super) fn add_route(&mut self, context: &str, name: &str, label: String) -> Result<()> {
        if label.trim().is_empty() {
            return Err(Error::Startup(format!(
                "route '{name}' has an empty metric_label: give it a name, or none for the \
                 default"
            )));
        }
        let key = (context.to_owned(), label);
        if let Some(other) = self.routes.get(&key) {
            return Err(Error::Startup(format!(
                "routes '{other}' and '{name}' have the same metric label '{}' in context \
                 '{context}': their metrics would be one series; give one another label with \
                 Route::metric_label",
                key.1
            )));
        }
        self.routes.insert(key, name.to_owned());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(result: Result<()>) -> String {
        match result {
            Err(Error::Startup(reason)) => reason,
            other => panic!("expected a start-up error, got {other:?}"),
        }
    }

    #[test]
    fn blank_and_shared_labels_are_refused() {
        let mut labels = MetricLabels::default();
        labels.add_context("default").unwrap();
        labels.add_route("default", "a", "a".into()).unwrap();
        labels.add_route("default", "b", "b".into()).unwrap();

        let reason = refusal(labels.add_context(" "));
        assert!(reason.contains("empty metric_label"), "{reason}");
        let reason = refusal(labels.add_context("default"));
        assert!(reason.contains("two RunnerContexts have the metric_label 'default'"), "{reason}");
        let reason = refusal(labels.add_route("default", "c", String::new()));
        assert!(reason.contains("route 'c' has an empty metric_label"), "{reason}");
        let reason = refusal(labels.add_route("default", "c", "a".into()));
        assert!(reason.contains("routes 'a' and 'c' have the same metric label 'a'"), "{reason}");

        // the same route label in another context is another series
        labels.add_context("slow").unwrap();
        labels.add_route("slow", "c", "a".into()).unwrap();
    }
}
