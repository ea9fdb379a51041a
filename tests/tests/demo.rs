//! `cargo xtask demo` tells its story to the end (real OpenVPN, router-side capture) and reads
//! well: every step passes, and no count says "1 packets".

use std::process::Command;

use testbed::{process::killswitch_bin, require_root};

#[test]
fn the_demo_tells_the_whole_story_and_every_step_holds() {
    require_root!();
    let out = Command::new("timeout")
        .args(["-k", "5", "120"])
        .arg(env!("CARGO_BIN_EXE_ks-demo"))
        .env("KILLSWITCH_BIN", killswitch_bin())
        .output()
        .expect("ks-demo runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "the daemon followed",
        "with no `killswitch up`",
        "`killswitch run -- probe",
        "the nftables fallback",
        "verified: ",
    ] {
        assert!(text.contains(step), "no step {step:?} in:\n{text}");
    }
    assert!(!text.contains(" 1 packets"), "{text}");
    assert!(
        !text.contains("FAILED") && !text.contains("leak!"),
        "{text}"
    );
}
