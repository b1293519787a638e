//! `cargo xtask validate-manifests`: builds every kustomization under deploy/ with `kubectl
//! kustomize` and validates each document it prints, offline (xtask/manifests/validate.py: the
//! Kubernetes schemas of the `kubernetes-validate` package, strict, and our CRDs' own schemas for
//! the custom resources). `cargo xtask test` runs it first.
//!
//! What it needs is installed on first use and reused after: the Python packages (pinned in
//! xtask/manifests/requirements.txt) go into a venv under ~/.cache/mesh-xtask, recreated when that
//! file changes. kubectl is not installed: Debian's `kubernetes-client` (kubectl 1.20, kustomize
//! v2.0.3) cannot build these kustomizations, see [`kubectl`]. Without a usable kubectl the
//! documents are gathered by [`resources_only_build`] instead (with a warning), so a fresh
//! machine still validates them.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::{root, run};

/// The kustomizations, by the name validate.py knows them by.
const BUILDS: &[(&str, &str)] = &[
    ("deploy", "deploy"),
    ("with-istio-crds", "deploy/overlays/with-istio-crds"),
    ("examples", "deploy/examples"),
];

/// Oldest kustomize (inside kubectl) that builds our kustomizations: directories in `resources`
/// need 2.1, and 4 is what kubectl 1.21+ ships.
const MIN_KUSTOMIZE_MAJOR: u32 = 4;

pub fn validate() -> Result<()> {
    // Without a usable kubectl (a fresh machine), build with the resources-only fallback so the
    // documents still get validated; it refuses any kustomization feature beyond `resources`.
    let kubectl = match kubectl() {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!(
                "validate-manifests: WARNING: {e:#}\nvalidate-manifests: building with the \
                 resources-only fallback instead of kustomize"
            );
            None
        }
    };
    let out = target_dir().join("manifests");
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut builds = Vec::new();
    for (name, dir) in BUILDS {
        let file = out.join(format!("{name}.yaml"));
        match &kubectl {
            Some(kubectl) => kustomize(kubectl, &root().join(dir), &file)?,
            None => std::fs::write(&file, resources_only_build(&root().join(dir))?)
                .with_context(|| format!("cannot write {}", file.display()))?,
        }
        builds.push(format!("{name}={}", file.display()));
    }
    let python = venv()?;
    let manifests = root().join("xtask/manifests");
    run(Command::new(python)
        .arg(manifests.join("validate.py"))
        .arg("--cases")
        .arg(manifests.join("policy-cases.yaml"))
        .args(&builds))
    .context("the manifests under deploy/ did not validate (see the FAIL lines above)")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// `$KUBECTL` or `kubectl` from PATH, with a kustomize recent enough for our kustomizations.
fn kubectl() -> Result<PathBuf> {
    let kubectl =
        std::env::var_os("KUBECTL").map_or_else(|| PathBuf::from("kubectl"), PathBuf::from);
    let how = "install a current kubectl (1.21 or later; the Kubernetes project's apt repository \
               or the Google Cloud SDK's `kubectl` package, or a static binary) and put it on PATH \
               or in $KUBECTL. Debian's `kubernetes-client` package is kubectl 1.20 with kustomize \
               v2.0.3, which cannot build directories listed in `resources` and so not these \
               kustomizations";
    let output = Command::new(&kubectl)
        .args(["version", "--client", "-o", "json"])
        .stderr(Stdio::null())
        .output();
    let json = match output {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => bail!("no usable kubectl ({}): {how}", kubectl.display()),
    };
    match kustomize_major(&json) {
        Some(major) if major >= MIN_KUSTOMIZE_MAJOR => Ok(kubectl),
        found => bail!(
            "{} has kustomize {}, {MIN_KUSTOMIZE_MAJOR} or later is needed: {how}",
            kubectl.display(),
            found.map_or_else(|| "of unknown version".to_string(), |m| format!("v{m}"))
        ),
    }
}

/// The kustomize major version from `kubectl version --client -o json`: its `"kustomizeVersion"`,
/// or, from kubectl before 1.24 which does not print it, the kubectl minor version (1.21 moved to
/// kustomize 4).
fn kustomize_major(json: &str) -> Option<u32> {
    let field = |name: &str| {
        let rest = &json[json.find(&format!("\"{name}\""))?..];
        rest.split('"').nth(3).map(str::to_string)
    };
    let Some(version) = field("kustomizeVersion") else {
        let minor: u32 = field("minor")?.trim_end_matches('+').parse().ok()?;
        return Some(if minor >= 21 { 4 } else { 2 });
    };
    version
        .trim_start_matches('v')
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// What `kubectl kustomize dir` prints for a kustomization that only lists `resources` (files, or
/// directories holding a kustomization of the same kind): the documents, in order. Anything else
/// in a kustomization is an error, so the fallback never builds something kustomize would not.
fn resources_only_build(dir: &Path) -> Result<String> {
    let path = dir.join("kustomization.yaml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = String::new();
    let mut in_resources = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if !line.starts_with([' ', '-']) {
            let key = trimmed.split(':').next().unwrap_or_default();
            match key {
                "apiVersion" | "kind" => in_resources = false,
                "resources" => in_resources = true,
                _ => bail!(
                    "{}: `{key}` needs a real kustomize (install kubectl 1.21 or later); the \
                     fallback only follows `resources`",
                    path.display()
                ),
            }
            continue;
        }
        let Some(item) = trimmed.strip_prefix("- ").filter(|_| in_resources) else {
            bail!("{}: cannot read line {line:?}", path.display());
        };
        let target = dir.join(item.trim());
        if target.is_dir() {
            out.push_str(&resources_only_build(&target)?);
        } else {
            let doc = std::fs::read_to_string(&target)
                .with_context(|| format!("{}: resource {item}", path.display()))?;
            out.push_str("---\n");
            out.push_str(doc.trim_start_matches("---\n"));
            if !out.ends_with('\n') {
                out.push('\n');
            }
        }
    }
    Ok(out)
}

/// `kubectl kustomize dir > file`; any warning (a deprecated field, say) is an error too.
fn kustomize(kubectl: &Path, dir: &Path, file: &Path) -> Result<()> {
    eprintln!(
        "validate-manifests: {} kustomize {}",
        kubectl.display(),
        dir.display()
    );
    let output = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .with_context(|| format!("cannot start {}", kubectl.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() || !stderr.trim().is_empty() {
        bail!(
            "kubectl kustomize {} {}:\n{}",
            dir.display(),
            if output.status.success() {
                "warned"
            } else {
                "failed"
            },
            stderr.trim()
        );
    }
    std::fs::write(file, &output.stdout).with_context(|| format!("cannot write {}", file.display()))
}

/// The venv with the pinned packages; (re)created when requirements.txt changed. Returns its
/// python.
fn venv() -> Result<PathBuf> {
    let requirements = root().join("xtask/manifests/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("cannot read {}", requirements.display()))?;
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"));
    let venv = cache.join("mesh-xtask/manifests-venv");
    let python = venv.join("bin/python");
    let stamp = venv.join("requirements.installed");
    let works = Command::new(&python)
        .args(["-c", "pass"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works && std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(python);
    }
    eprintln!(
        "validate-manifests: installing the validator's Python packages into {}",
        venv.display()
    );
    create_venv(&venv)?;
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "-r",
        ])
        .arg(&requirements))?;
    std::fs::write(&stamp, &wanted).with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(python)
}

fn create_venv(venv: &Path) -> Result<()> {
    let create = |python: &str| {
        Command::new(python)
            .args(["-m", "venv", "--clear"])
            .arg(venv)
            .status()
            .is_ok_and(|s| s.success())
    };
    if create("python3") {
        return Ok(());
    }
    // Debian's own python3 ships venv separately.
    eprintln!("validate-manifests: python3 cannot create a venv; installing Debian's python3-venv");
    run(Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "python3-venv",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    if create("/usr/bin/python3") {
        return Ok(());
    }
    bail!(
        "cannot create a Python venv at {} (needs python3 with the venv module)",
        venv.display()
    )
}

#[cfg(test)]
mod tests {
    use super::kustomize_major;

    #[test]
    fn reads_the_kustomize_version() {
        let json = r#"{
  "clientVersion": { "major": "1", "minor": "32", "gitVersion": "v1.32.4" },
  "kustomizeVersion": "v5.5.0"
}"#;
        assert_eq!(kustomize_major(json), Some(5));
        let old =
            |minor: &str| format!(r#"{{"clientVersion": {{"major": "1", "minor": "{minor}"}}}}"#);
        assert_eq!(kustomize_major(&old("20")), Some(2));
        assert_eq!(kustomize_major(&old("23+")), Some(4));
        assert_eq!(kustomize_major("{}"), None);
    }
}
