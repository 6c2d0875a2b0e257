//! Desired state and planning: `deploy.json` (which service runs which commit, see
//! [`manifest`]), `config.json` (how each service is built and run, see [`catalog`]) and the
//! pure planner that joins them with the observed live state ([`plan`]).
//!
//! Everything here is data in, data out. It must not fetch Git, talk to agents or read files
//! other than through the thin `load` functions; the CLI does those and passes the results in.
//! The environment-to-ref mapping is fixed in code ([`Environment::desired_ref`]) and no
//! configuration can change it or enable a prod apply.

pub mod catalog;
pub mod devenv;
mod document;
pub mod env;
pub mod manifest;
pub mod plan;

pub use catalog::{Catalog, CatalogError, CatalogWarning, DeploymentMode, ParsedCatalog};
pub use document::DocumentError;
pub use manifest::{CiSpec, Environment, Manifest, ManifestError, ServiceEntry};
pub use plan::{Action, LiveState, Observation, Plan, PlanError, PlannedService};

#[cfg(test)]
mod tests {
    use super::*;

    /// The project's own `deploy.json` and `config.json` validate and plan together.
    #[test]
    fn the_repository_files_validate_and_join() {
        let manifest = manifest::parse(include_bytes!("../../../deploy.json")).unwrap();
        let parsed = catalog::parse(include_bytes!("../../../config.json")).unwrap();
        assert_eq!(parsed.warnings, []);
        let catalog = parsed.catalog;

        let ci = manifest.ci(Environment::Dev).unwrap();
        assert_eq!(ci.script_path, "scripts/ci/dev-e2e.sh");
        let dev = manifest.services_for(Some(Environment::Dev)).unwrap();
        let ids: Vec<&str> = dev.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["backend-core", "frontend", "code-queue"]);
        assert!(dev.iter().all(|s| s.full_commit().is_some()));

        for id in [
            "backend-core",
            "frontend",
            "code-queue",
            "code-queue-mgr",
            "decision-center",
            "k3sctl-adapter",
        ] {
            assert!(
                catalog.service(id).is_some(),
                "{id} missing from config.json"
            );
        }
        let dev_env = catalog.environment(Environment::Dev).unwrap();
        assert_eq!(dev_env.namespace, "unidesk-dev");
        assert_eq!(
            dev_env.apply_services,
            ["backend-core", "frontend", "code-queue"]
        );
        assert!(
            catalog
                .environment(Environment::Prod)
                .unwrap()
                .apply_services
                .is_empty()
        );
        assert_eq!(
            catalog.service("k3sctl-adapter").unwrap().deployment.mode,
            DeploymentMode::UnideskDirect
        );
        assert_eq!(
            catalog.service("code-queue-mgr").unwrap().deployment.mode,
            DeploymentMode::InternalSidecar
        );

        // The dev plan is complete, in the dev namespace, and passes the dev apply guard.
        let p = plan::plan(
            dev,
            &catalog,
            Some(Environment::Dev),
            None,
            &LiveState::default(),
        )
        .unwrap();
        for line in &p.services {
            assert_eq!(
                line.namespace.as_deref(),
                Some("unidesk-dev"),
                "{}",
                line.id
            );
            assert_eq!(line.node.as_deref(), Some("d601"), "{}", line.id);
        }
        assert_eq!(
            plan::apply_guard(Some(Environment::Dev), &p, &catalog, None),
            Ok(())
        );
    }

    /// Seed rule: a dev manifest that still lists code-queue-mgr fails apply as a whole, but
    /// proceeds when narrowed to an enabled service.
    #[test]
    fn dev_apply_with_code_queue_mgr_needs_service() {
        let parsed = catalog::parse(include_bytes!("../../../config.json")).unwrap();
        let text = r#"{"schemaVersion":1,"environment":"dev","services":[
            {"id":"backend-core","repo":"https://github.com/pikasTech/unidesk","commitId":"0c3cdb4"},
            {"id":"code-queue-mgr","repo":"https://github.com/pikasTech/unidesk","commitId":"0c3cdb4"}]}"#;
        let m = manifest::parse(text.as_bytes()).unwrap();
        let services = m.services_for(Some(Environment::Dev)).unwrap();
        let p = plan::plan(
            services,
            &parsed.catalog,
            Some(Environment::Dev),
            None,
            &LiveState::default(),
        )
        .unwrap();
        let err = plan::apply_guard(Some(Environment::Dev), &p, &parsed.catalog, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("code-queue-mgr (unsupported: "), "{err}");
        assert!(!err.contains("backend-core"), "{err}");
        assert_eq!(
            plan::apply_guard(
                Some(Environment::Dev),
                &p,
                &parsed.catalog,
                Some("backend-core")
            ),
            Ok(())
        );
    }
}
