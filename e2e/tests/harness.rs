//! The harness itself: a tool ended by SIGTERM stops what it started.
//! (This test binary sends SIGTERM to itself; `until_terminated` catches it.)

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferrimesh_e2e::{Process, Scratch, until_terminated};
use tokio::sync::oneshot;

#[tokio::test]
async fn sigterm_drops_the_work_and_stops_its_processes() -> anyhow::Result<()> {
    let scratch = Scratch::new("until-terminated")?;
    let log = scratch.path("sleep.log");
    let (started, pid) = oneshot::channel();
    let tool = tokio::spawn(until_terminated(async move {
        let sleeper = Process::spawn("sleep", Command::new("sleep").arg("600"), &log)?;
        let _ = started.send(sleeper.id());
        std::future::pending::<()>().await;
        drop(sleeper);
        Ok(())
    }));
    let pid = pid.await?;
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the child runs"
    );

    let sent = Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()?;
    assert!(sent.success());
    let result = tokio::time::timeout(Duration::from_secs(10), tool).await??;
    let error = result.expect_err("SIGTERM ends the work with an error");
    assert!(error.to_string().contains("SIGTERM"), "{error}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the child was stopped and reaped"
    );
    Ok(())
}
