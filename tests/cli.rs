//! End-to-end checks of the `instaflow` binary.

use std::path::PathBuf;
use std::process::Command;

fn instaflow() -> Command {
    Command::new(env!("CARGO_BIN_EXE_instaflow"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("instaflow-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn toy_prints_the_table_and_writes_figures() {
    let out = temp_dir("toy");
    let result = instaflow()
        .args(["toy", "--backend", "cpu", "--steps-scale", "0.05", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    for row in [
        "| 1-RF |",
        "| 2-RF |",
        "| 1-RF+distill |",
        "| 2-RF+distill |",
    ] {
        assert!(stdout.contains(row), "missing {row} in\n{stdout}");
    }
    for f in [
        "trajectories.png",
        "one_step.png",
        "losses.png",
        "report.md",
        "report.json",
    ] {
        let path = out.join(f);
        let bytes =
            std::fs::read(&path).unwrap_or_else(|_| panic!("{} not written", path.display()));
        if f.ends_with(".png") {
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{f} is a PNG");
            assert!(bytes.len() > 5_000, "{f} has content");
        }
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), 4);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bad_arguments_give_one_clear_error() {
    let cases: [(&[&str], &str); 3] = [
        (
            &["toy", "--steps-scale=-1"],
            "--steps-scale must be a positive number",
        ),
        (
            &["toy", "--guidance", "NaN"],
            "--guidance must be a finite number",
        ),
        (&["toy", "--backend", "tpu"], "invalid value 'tpu'"),
    ];
    for (args, message) in cases {
        let result = instaflow().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{args:?} must fail");
        assert!(
            stderr.contains(message),
            "{args:?}: expected {message:?} in\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    }
}

#[test]
fn unwritable_output_folder_is_an_error_not_a_panic() {
    let file = temp_dir("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let result = instaflow()
        .args(["toy", "--backend", "cpu", "--steps-scale", "0.01", "--out"])
        .arg(file.join("sub"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success());
    assert!(stderr.starts_with("error: creating"), "{stderr}");
    let _ = std::fs::remove_file(&file);
}

#[test]
fn help_explains_the_commands() {
    let result = instaflow().arg("--help").output().unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    for word in ["toy", "bench-backends", "backends", "--backend"] {
        assert!(stdout.contains(word), "--help lacks {word}:\n{stdout}");
    }
}
