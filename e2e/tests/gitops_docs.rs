//! `docs/gitops.md`, checked as written: every YAML block parses; the Argo CD Applications and the Flux
//! objects name paths, chart values, kinds and phases that exist here; the Argo CD health checks (Lua) cover the
//! three kinds and, run with Lua 5.1 (the dialect of Argo CD's gopher-lua) against status objects shaped as
//! the operator writes them (`tests/testdata/gitops/`, each read as its CRD type first), give the expected health
//! and message; Flux's CEL health expressions place every phase of each kind in exactly one of in progress,
//! failed and current. No cluster is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anneal_crds::{EvalGate, ModelServer, TrainingJob};
use anyhow::{Context, Result, anyhow, bail, ensure};
use mlua::serde::SerializeOptions;
use mlua::{Lua, LuaSerdeExt};
use serde::Deserialize;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The documents of every ```yaml block of docs/gitops.md, in order, as JSON.
fn documents() -> Result<Vec<Value>> {
    let page = std::fs::read_to_string(repo().join("docs/gitops.md"))?;
    let mut documents = Vec::new();
    let mut block: Option<String> = None;
    for line in page.lines() {
        match (&mut block, line.trim_end()) {
            (None, "```yaml") => block = Some(String::new()),
            (Some(text), "```") => {
                for document in serde_yaml::Deserializer::from_str(text) {
                    let value = serde_yaml::Value::deserialize(document)
                        .with_context(|| format!("a YAML block of docs/gitops.md:\n{text}"))?;
                    documents.push(serde_json::to_value(value)?);
                }
                block = None;
            }
            (Some(text), _) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    ensure!(block.is_none(), "an unterminated block in docs/gitops.md");
    Ok(documents)
}

/// The document of `kind` named `name`.
fn find<'a>(documents: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    documents
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name} in docs/gitops.md"))
}

/// The project's kinds: kind -> (group/version, the phases of `status.phase`), from the generated CRDs.
fn kinds() -> Result<BTreeMap<String, (String, Vec<String>)>> {
    let mut kinds = BTreeMap::new();
    for crd in anneal_crds::all_crds() {
        let crd = serde_json::to_value(crd)?;
        let kind = crd["spec"]["names"]["kind"]
            .as_str()
            .context("kind")?
            .to_string();
        let version = &crd["spec"]["versions"][0];
        let api_version = format!(
            "{}/{}",
            crd["spec"]["group"].as_str().context("group")?,
            version["name"].as_str().context("version")?
        );
        let phases = version
            .pointer("/schema/openAPIV3Schema/properties/status/properties/phase/enum")
            .and_then(Value::as_array)
            .with_context(|| format!("{kind}: no enum of status.phase"))?
            .iter()
            .filter_map(|p| p.as_str().map(str::to_string))
            .collect();
        kinds.insert(kind, (api_version, phases));
    }
    ensure!(kinds.len() == 3, "three kinds: {:?}", kinds.keys());
    Ok(kinds)
}

/// Every key of `given` (recursively, where both are maps) is a key of the chart's values.yaml.
fn chart_values_exist(given: &Value) -> Result<()> {
    let text = std::fs::read_to_string(repo().join("charts/anneal/values.yaml"))?;
    let values: Value = serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(&text)?)?;
    fn walk(given: &Value, values: &Value, path: &str) -> Result<()> {
        let (Some(given), Some(values)) = (given.as_object(), values.as_object()) else {
            return Ok(());
        };
        for (key, value) in given {
            let path = format!("{path}.{key}");
            let known = values
                .get(key)
                .with_context(|| format!("{path} is not a value of charts/anneal/values.yaml"))?;
            walk(value, known, &path)?;
        }
        Ok(())
    }
    walk(given, &values, "")
}

/// `path` (relative, `./` allowed) exists in this repository.
fn in_repo(path: &str) -> Result<PathBuf> {
    let full = repo().join(path.trim_start_matches("./"));
    ensure!(full.exists(), "{path} does not exist in this repository");
    Ok(full)
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn argo_cd_applications_install_the_chart_and_a_pipeline_that_exist_here() -> Result<()> {
    let documents = documents()?;
    let chart = find(&documents, "Application", "anneal")?;
    let source = &chart["spec"]["source"];
    ensure!(
        source["path"] == "charts/anneal" && in_repo("charts/anneal/Chart.yaml").is_ok(),
        "the chart's Application installs charts/anneal: {source}"
    );
    chart_values_exist(&source["helm"]["valuesObject"])?;
    let options = strings(&chart["spec"]["syncPolicy"]["syncOptions"]);
    ensure!(
        options.contains(&"ServerSideApply=true") && options.contains(&"CreateNamespace=true"),
        "server-side apply (the CRDs are too large for client-side apply) and the namespace: {options:?}"
    );
    for application in [chart, find(&documents, "Application", "arith-pipeline")?] {
        ensure!(
            application["spec"]["syncPolicy"]["managedNamespaceMetadata"]["labels"]["pod-security.kubernetes.io/enforce"]
                == "restricted",
            "{}: the namespace enforces the restricted profile",
            application["metadata"]["name"]
        );
    }

    let pipeline = find(&documents, "Application", "arith-pipeline")?;
    let source = &pipeline["spec"]["source"];
    ensure!(
        source["repoURL"] == chart["spec"]["source"]["repoURL"],
        "one repository"
    );
    let dir = in_repo(source["path"].as_str().context("path")?)?;
    let include = source["directory"]["include"]
        .as_str()
        .context("directory.include")?;
    let files: Vec<&str> = include
        .trim_start_matches('{')
        .trim_end_matches('}')
        .split(',')
        .collect();
    let mut kinds_applied = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(dir.join(file))
            .with_context(|| format!("{file} of directory.include"))?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document)?;
            if let Some(kind) = value.get("kind").and_then(|k| k.as_str()) {
                kinds_applied.insert(kind.to_string());
            }
        }
    }
    let expected: BTreeSet<String> = [
        "EvalGate",
        "ModelServer",
        "PersistentVolumeClaim",
        "TrainingJob",
    ]
    .map(String::from)
    .into();
    ensure!(
        kinds_applied == expected,
        "the pipeline Application applies the three kinds and the models claim: {kinds_applied:?}"
    );
    Ok(())
}

/// The Argo CD health script of each kind, from `argocd-cm`.
fn health_scripts(documents: &[Value]) -> Result<BTreeMap<String, String>> {
    let cm = find(documents, "ConfigMap", "argocd-cm")?;
    let data = cm["data"].as_object().context("argocd-cm data")?;
    let mut scripts = BTreeMap::new();
    for (key, script) in data {
        let Some(group_kind) = key.strip_prefix("resource.customizations.health.") else {
            bail!("argocd-cm has {key}, not a health customization");
        };
        let (group, kind) = group_kind.split_once('_').context("group_Kind")?;
        ensure!(group == "anneal.dev", "{key}: group anneal.dev");
        scripts.insert(
            kind.to_string(),
            script.as_str().context("script")?.to_string(),
        );
    }
    Ok(scripts)
}

/// Runs an Argo CD health script on `object` (the global `obj`, as Argo CD sets it): (status, message).
fn health(script: &str, object: &Value) -> Result<(String, String)> {
    let lua = Lua::new();
    let options = SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false);
    let obj = lua
        .to_value_with(object, options)
        .map_err(|e| anyhow!("{e}"))?;
    lua.globals().set("obj", obj).map_err(|e| anyhow!("{e}"))?;
    let hs: mlua::Table = lua
        .load(script)
        .set_name("health.lua")
        .eval()
        .map_err(|e| anyhow!("{e}"))?;
    let status: String = hs.get("status").map_err(|e| anyhow!("{e}"))?;
    let message: String = hs.get("message").map_err(|e| anyhow!("{e}"))?;
    Ok((status, message))
}

#[derive(Deserialize)]
struct Fixtures {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    expect: Expect,
    object: Value,
}

#[derive(Deserialize)]
struct Expect {
    status: String,
    message: String,
}

#[test]
fn argo_cd_health_checks_give_each_status_fixture_its_health() -> Result<()> {
    let documents = documents()?;
    let scripts = health_scripts(&documents)?;
    let kinds = kinds()?;
    ensure!(
        scripts.keys().eq(kinds.keys()),
        "a health check for each kind: {:?} vs {:?}",
        scripts.keys(),
        kinds.keys()
    );
    let mut failures = Vec::new();
    for (kind, (api_version, phases)) in &kinds {
        let path = repo().join(format!(
            "e2e/tests/testdata/gitops/{}.yaml",
            kind.to_lowercase()
        ));
        let fixtures: Fixtures = serde_yaml::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| path.display().to_string())?;
        let mut covered = BTreeSet::new();
        for (i, case) in fixtures.cases.iter().enumerate() {
            let object = &case.object;
            ensure!(
                object["kind"] == kind.as_str() && object["apiVersion"] == api_version.as_str(),
                "{kind} case {i}: {}/{}",
                object["apiVersion"],
                object["kind"]
            );
            // The fixture has the shape of the CRD's types (a renamed field or phase breaks this).
            let typed = match kind.as_str() {
                "TrainingJob" => serde_json::from_value::<TrainingJob>(object.clone()).map(drop),
                "EvalGate" => serde_json::from_value::<EvalGate>(object.clone()).map(drop),
                "ModelServer" => serde_json::from_value::<ModelServer>(object.clone()).map(drop),
                other => bail!("no type for {other}"),
            };
            typed.with_context(|| format!("{kind} case {i} is not a {kind}"))?;
            if let Some(phase) = object["status"]["phase"].as_str() {
                covered.insert(phase.to_string());
            }
            let (status, message) =
                health(&scripts[kind], object).with_context(|| format!("{kind} case {i}"))?;
            if status != case.expect.status || message != case.expect.message {
                failures.push(format!(
                    "{kind} case {i} (phase {}): got {status} {message:?}, expected {} {:?}",
                    object["status"]["phase"], case.expect.status, case.expect.message
                ));
            }
        }
        let all: BTreeSet<String> = phases.iter().cloned().collect();
        ensure!(
            covered == all,
            "{kind}: a fixture for every phase {all:?}, have {covered:?}"
        );
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn flux_objects_name_what_exists_and_health_expressions_place_every_phase() -> Result<()> {
    let documents = documents()?;
    let anneal = find(&documents, "GitRepository", "anneal")?;
    let argo = find(&documents, "Application", "anneal")?;
    ensure!(
        anneal["spec"]["url"] == argo["spec"]["source"]["repoURL"],
        "Flux and Argo CD take the chart from the same repository"
    );
    let release = find(&documents, "HelmRelease", "anneal")?;
    let chart = &release["spec"]["chart"]["spec"];
    in_repo(&format!(
        "{}/Chart.yaml",
        chart["chart"].as_str().context("chart")?
    ))?;
    ensure!(
        chart["sourceRef"]["kind"] == "GitRepository" && chart["sourceRef"]["name"] == "anneal",
        "the chart comes from GitRepository anneal: {chart}"
    );
    ensure!(
        release["spec"]["install"]["crds"] == "Create"
            && release["spec"]["upgrade"]["crds"] == "CreateReplace",
        "CRDs created on install and replaced on upgrade"
    );
    chart_values_exist(&release["spec"]["values"])?;
    let namespace = find(&documents, "Namespace", "anneal-system")?;
    ensure!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted",
        "anneal-system is restricted"
    );
    ensure!(
        release["metadata"]["namespace"] == "anneal-system",
        "released into anneal-system"
    );

    let sources: BTreeSet<&str> = documents
        .iter()
        .filter(|d| d["kind"] == "GitRepository")
        .filter_map(|d| d["metadata"]["name"].as_str())
        .collect();
    let kustomizations: Vec<&Value> = documents
        .iter()
        .filter(|d| d["kind"] == "Kustomization")
        .collect();
    let names: BTreeSet<&str> = kustomizations
        .iter()
        .filter_map(|k| k["metadata"]["name"].as_str())
        .collect();
    for k in &kustomizations {
        let name = &k["metadata"]["name"];
        let source = k["spec"]["sourceRef"]["name"].as_str().unwrap_or_default();
        ensure!(
            sources.contains(source),
            "Kustomization {name}: source {source:?} is a GitRepository of the page"
        );
        for dependency in k["spec"]["dependsOn"].as_array().into_iter().flatten() {
            let dependency = dependency["name"].as_str().unwrap_or_default();
            ensure!(
                names.contains(dependency),
                "Kustomization {name} depends on {dependency}, which the page defines"
            );
        }
    }

    let pipeline = find(&documents, "Kustomization", "arith-pipeline")?;
    let kinds = kinds()?;
    let checks = pipeline["spec"]["healthCheckExprs"]
        .as_array()
        .context("healthCheckExprs")?;
    let mut checked = BTreeSet::new();
    for check in checks {
        let kind = check["kind"].as_str().context("kind")?;
        let (api_version, phases) = kinds.get(kind).with_context(|| format!("kind {kind}"))?;
        ensure!(
            check["apiVersion"] == api_version.as_str(),
            "{kind}: apiVersion {api_version}"
        );
        // Each phase is named in exactly one expression; no expression names a phase the kind lacks.
        let named = |field: &str| -> BTreeSet<String> {
            check[field]
                .as_str()
                .unwrap_or_default()
                .split('\'')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        };
        let fields = ["inProgress", "failed", "current"];
        let mut seen = BTreeSet::new();
        for field in fields {
            for phase in named(field) {
                ensure!(
                    phases.contains(&phase),
                    "{kind}.{field} names {phase}, not a phase of {kind} ({phases:?})"
                );
                ensure!(
                    seen.insert(phase.clone()),
                    "{kind}: {phase} in two expressions"
                );
            }
        }
        let all: BTreeSet<String> = phases.iter().cloned().collect();
        ensure!(
            seen == all,
            "{kind}: every phase placed: {seen:?} vs {all:?}"
        );
        checked.insert(kind.to_string());
    }
    ensure!(
        checked.iter().eq(kinds.keys()),
        "a health expression for each kind: {checked:?}"
    );
    Ok(())
}
