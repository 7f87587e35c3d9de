//! [`EnabledEntrypoints`]: which routes of a service start their entrypoint. All do, unless
//! a test restricts them to some: the others are set up without it (their dependencies only),
//! so nothing is declared or consumed for them, and tests call them through hooks.

use crate::error::{Error, Result};

/// The routes whose entrypoints start.
#[derive(Clone, Debug, Default)]
pub(crate) enum EnabledEntrypoints {
    /// Every route's.
    #[default]
    All,
    /// Only those of the routes named.
    Only(Vec<String>),
}

impl EnabledEntrypoints {
    /// Refuse names that are not among `routes`.
    pub(crate) fn check<'a>(&self, routes: impl Iterator<Item = &'a str> + Clone) -> Result<()> {
        let EnabledEntrypoints::Only(names) = self else { return Ok(()) };
        for name in names {
            if !routes.clone().any(|route| route == name) {
                let known = routes.map(str::to_owned).collect();
                return Err(Error::UnknownRoute { route: name.clone(), known });
            }
        }
        Ok(())
    }

    /// Whether `route` starts its entrypoint.
    pub(crate) fn enables(&self, route: &str) -> bool {
        match self {
            EnabledEntrypoints::All => true,
            EnabledEntrypoints::Only(names) => names.iter().any(|name| name == route),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_or_only_the_routes_named() {
        assert!(EnabledEntrypoints::All.enables("any"));
        let only = EnabledEntrypoints::Only(vec!["paid".into()]);
        assert!(only.enables("paid") && !only.enables("refunded"));
        assert!(only.check(["refunded", "paid"].into_iter()).is_ok());
    }

    #[test]
    fn unknown_names_are_refused_with_the_known_ones() {
        let only = EnabledEntrypoints::Only(vec!["paid".into(), "payed".into()]);
        let error = only.check(["paid", "refunded"].into_iter()).unwrap_err();
        assert!(
            matches!(&error, Error::UnknownRoute { route, known }
                if route == "payed" && known == &["paid", "refunded"]),
            "{error:?}"
        );
        assert_eq!(error.to_string(), "no route named 'payed' (routes: paid, refunded)");
    }
}
