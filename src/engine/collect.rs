use std::path::PathBuf;
use std::time::Duration;

use super::boot::Running;
use super::context::JobContext;
use super::prepare::Prepared;
use super::run::Engine;
use crate::artifacts::{AgentLink, ArtifactSources, Collection, collect_artifacts};
use crate::job::FINAL_SCREENSHOT;
use crate::vm::take_screenshot;

impl Engine {
    /// Phase *collect*: the declared artifacts (agent port, qemu-ga as the fallback),
    /// then the final screenshot, relative to the job directory.
    pub(super) async fn collect(
        &self,
        ctx: &mut JobContext<'_>,
        prepared: &Prepared,
        running: &Running,
        agent: &AgentLink,
    ) -> (Collection, Option<String>) {
        let vm = &running.vm;
        let sources = ArtifactSources {
            agent: agent.clone(),
            qga: prepared
                .machine
                .guest_agent
                .then(|| PathBuf::from(vm.run_dir().qga_socket())),
        };
        let collection = collect_artifacts(
            &prepared.payload.artifacts,
            &sources,
            ctx.dir(),
            &self.config.artifacts,
        )
        .await;
        for line in &collection.notes {
            ctx.note(line).await;
        }
        ctx.phase("artifacts");

        let mut screenshot = None;
        if let Ok(shot) =
            take_screenshot(vm.qmp(), vm.run_dir().path(), Duration::from_secs(10)).await
        {
            let path = ctx.dir().file(FINAL_SCREENSHOT);
            let stored = match path.parent() {
                Some(dir) => tokio::fs::create_dir_all(dir).await.is_ok(),
                None => true,
            } && tokio::fs::write(&path, &shot.png).await.is_ok();
            if stored {
                screenshot = Some(FINAL_SCREENSHOT.to_owned());
            }
        }
        ctx.phase("screenshot");
        (collection, screenshot)
    }
}
