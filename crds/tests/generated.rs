//! The committed CRD YAML matches what the types generate, and the whole schema is pinned by a
//! snapshot. After an intended change: `cargo run -p anneal-crds --bin crdgen` and
//! `ANNEAL_UPDATE_SNAPSHOTS=1 cargo test -p anneal-crds --test generated`, then review the diff.

use std::path::{Path, PathBuf};

use anneal_crds::generate::{all_crds, generated_files};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate has a parent")
        .to_path_buf()
}

#[test]
fn committed_crd_yaml_matches_the_types() {
    let mut stale = Vec::new();
    for (rel, generated) in generated_files().expect("CRDs serialise") {
        let committed = std::fs::read_to_string(repo_root().join(&rel)).unwrap_or_default();
        if committed != generated {
            stale.push(rel);
        }
    }
    assert!(
        stale.is_empty(),
        "out of date (run `cargo run -p anneal-crds --bin crdgen`): {stale:?}"
    );
}

#[test]
fn schema_snapshot_pins_every_field() {
    let update = std::env::var_os("ANNEAL_UPDATE_SNAPSHOTS").is_some();
    for crd in all_crds() {
        let name = crd.metadata.name.clone().expect("CRD has a name");
        let json = serde_json::to_string_pretty(
            &serde_json::to_value(&crd.spec).expect("spec serialises"),
        )
        .expect("spec prints")
            + "\n";
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/snapshots/{name}.json"));
        if update {
            std::fs::write(&path, &json).expect("snapshot written");
            continue;
        }
        let pinned = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (create it with ANNEAL_UPDATE_SNAPSHOTS=1)",
                path.display()
            )
        });
        assert!(
            pinned == json,
            "the schema of {name} changed; review and re-pin with ANNEAL_UPDATE_SNAPSHOTS=1\n{}",
            first_difference(&pinned, &json)
        );
    }
}

fn first_difference(old: &str, new: &str) -> String {
    for (i, (a, b)) in old.lines().zip(new.lines()).enumerate() {
        if a != b {
            return format!("line {}:\n- {a}\n+ {b}", i + 1);
        }
    }
    format!(
        "lengths differ: {} vs {} lines",
        old.lines().count(),
        new.lines().count()
    )
}
