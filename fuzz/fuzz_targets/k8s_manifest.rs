//! Feeds arbitrary text to the k8s manifest parser and its guards (`parse`, `guard`,
//! `narrow`, `stamp`). None may panic. Parsing is deterministic; every object `parse`
//! returns has the fields it promises; an object `narrow` keeps passed every guard rule in
//! the selected namespace; `stamp` leaves no placeholder behind.
//!
//! The module is compiled from the agent's own source file: it depends only on serde,
//! serde_json, serde_yaml_ng and thiserror, so this target does not build the agent crate
//! under the fuzzer's instrumentation.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code, unreachable_pub)]
#[path = "../../agent/src/launch/k8s/manifest.rs"]
mod manifest;

use manifest::{DeploymentTarget, Selection, Stamp, guard, narrow, parse, stamp};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(objects) = parse(text) else {
        return;
    };
    assert_eq!(parse(text).ok().as_ref(), Some(&objects), "parse is deterministic");
    for object in &objects {
        for path in [&["apiVersion"][..], &["kind"], &["metadata", "name"]] {
            let field = path.iter().try_fold(&object.value, |v, k| v.get(k));
            assert!(field.and_then(|f| f.as_str()).is_some_and(|s| !s.is_empty()));
        }
        let _ = guard(&object.value, "unidesk-dev");
    }
    let targets = vec![DeploymentTarget {
        name: "web".into(),
        container: "web".into(),
    }];
    let selection = Selection {
        service_id: "web".into(),
        namespace: "unidesk-dev".into(),
        deployments: targets.clone(),
    };
    let Ok(kept) = narrow(objects, &selection) else {
        return;
    };
    for object in &kept {
        let violations = guard(&object.value, "unidesk-dev");
        assert!(violations.is_empty(), "narrow kept a violation: {violations:?}");
    }
    let stamp_with = Stamp {
        image: "registry.local/web:ci".into(),
        service_id: "web".into(),
        repo: "https://git.local/web.git".into(),
        commit: "a".repeat(40),
        requested_commit: "aaaaaaa".into(),
    };
    if let Ok(stamped) = stamp(kept, &targets, &stamp_with) {
        for object in &stamped {
            assert!(!has_placeholder(&object.value), "placeholder left: {}", object.value);
        }
    }
});

/// True when a string scalar anywhere in `value` still holds a placeholder.
fn has_placeholder(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains("{{UNIDESK_"),
        serde_json::Value::Array(items) => items.iter().any(has_placeholder),
        serde_json::Value::Object(map) => map.values().any(has_placeholder),
        _ => false,
    }
}
