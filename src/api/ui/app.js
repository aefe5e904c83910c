// The worker's web page: the job list, and a job's status, live log, screenshots and
// display. Everything comes from the worker's own API (docs/api.md) with the token
// kept in this tab (sessionStorage); `#token=…` in the address gives it and is removed.

const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get("token")) {
  sessionStorage.setItem("qw-token", fragment.get("token"));
  history.replaceState(null, "", location.pathname + location.search);
}
const token = () => sessionStorage.getItem("qw-token");
const $ = (id) => document.getElementById(id);
const element = (tag, { dataset = {}, ...props } = {}, children = []) => {
  const e = Object.assign(document.createElement(tag), props);
  Object.assign(e.dataset, dataset);
  for (const child of children) e.append(child);
  return e;
};

class ApiError extends Error {
  constructor(status, code, message) {
    super(`${status} ${code}: ${message}`);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const answer = await fetch(path, {
    ...options,
    headers: { ...(options.headers || {}), Authorization: `Bearer ${token()}` },
  });
  if (!answer.ok) {
    const body = await answer.json().catch(() => ({}));
    throw new ApiError(answer.status, body.code || "error", body.message || answer.statusText);
  }
  return answer;
}

function showError(error) {
  if (error.status === 401) {
    sessionStorage.removeItem("qw-token");
    askForToken();
    return;
  }
  $("error").textContent = String(error.message || error);
  $("error").hidden = false;
}

function askForToken() {
  const form = $("login");
  form.hidden = false;
  form.onsubmit = (event) => {
    event.preventDefault();
    sessionStorage.setItem("qw-token", $("token").value.trim());
    location.reload();
  };
}

async function jobList() {
  const table = element("table", { id: "jobs" }, [
    element("thead", {}, [element("tr", {}, ["job", "state", "runs", "worker"].map((h) => element("th", { textContent: h })))]),
    element("tbody"),
  ]);
  $("content").replaceChildren(element("h1", { textContent: "Jobs" }), table);
  const refresh = async () => {
    const page = await (await api("/v1/jobs?limit=100")).json();
    const rows = page.jobs.map((job) =>
      element("tr", { dataset: { job: job.jobId, state: job.state } }, [
        element("td", {}, [element("a", { href: `/ui/job?id=${encodeURIComponent(job.jobId)}`, textContent: job.jobId })]),
        element("td", { className: "state", textContent: job.state }),
        element("td", { textContent: String(job.runs) }),
        element("td", { textContent: job.worker || "" }),
      ]),
    );
    table.tBodies[0].replaceChildren(...rows);
  };
  await refresh();
  setInterval(() => refresh().catch(showError), 2000);
}

async function followLog(id, pre) {
  const answer = await api(`/v1/jobs/${encodeURIComponent(id)}/log?follow=true`);
  const reader = answer.body.getReader();
  const decoder = new TextDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    pre.append(decoder.decode(value, { stream: true }));
    pre.dataset.bytes = String(Number(pre.dataset.bytes || 0) + value.length);
    pre.scrollTop = pre.scrollHeight;
  }
  pre.dataset.ended = "true";
}

async function showScreenshot(answer, shots) {
  const blob = await answer.blob();
  shots.prepend(element("img", { src: URL.createObjectURL(blob), alt: `screenshot ${new Date().toISOString()}` }));
}

async function showDisplay(id, screen) {
  const { default: RFB } = await import("/ui/novnc/core/rfb.js");
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = `${scheme}//${location.host}/v1/jobs/${encodeURIComponent(id)}/display`;
  // Browsers cannot send Authorization on a WebSocket: the token goes as a subprotocol.
  const rfb = new RFB(screen, url, { wsProtocols: ["binary", `bearer.${token()}`] });
  rfb.viewOnly = true;
  rfb.scaleViewport = false;
  screen.dataset.state = "connecting";
  rfb.addEventListener("connect", () => (screen.dataset.state = "connected"));
  rfb.addEventListener("disconnect", (event) => {
    screen.dataset.state = "disconnected";
    const note = event.detail && event.detail.clean ? "The display closed." : "The display's connection failed.";
    screen.replaceWith(element("p", { id: "screen", textContent: note, dataset: { state: "disconnected" } }));
  });
  rfb.addEventListener("securityfailure", (event) => showError(new Error(`display: ${event.detail.reason || "refused"}`)));
  window.qwDisplay = rfb;
}

async function jobPage() {
  const id = new URLSearchParams(location.search).get("id");
  const status = await (await api(`/v1/jobs/${encodeURIComponent(id)}`)).json();
  const details = element("dl", { id: "status" }, [
    element("dt", { textContent: "state" }),
    element("dd", { className: "state", textContent: status.state, dataset: { state: status.state } }),
    element("dt", { textContent: "worker" }),
    element("dd", { textContent: status.worker || "" }),
    element("dt", { textContent: "runs" }),
    element("dd", { textContent: String(status.runs) }),
    element("dt", { textContent: "exit code" }),
    element("dd", { textContent: status.report && status.report.exitCode != null ? String(status.report.exitCode) : "" }),
  ]);
  const log = element("pre", { id: "log" });
  const shots = element("div", { id: "shots" });
  const shoot = element("button", { id: "shoot", textContent: "Take a screenshot" });
  const screen = element("div", { id: "screen" });
  $("content").replaceChildren(
    element("h1", { id: "title", textContent: id }),
    details,
    element("h2", { textContent: "Log" }),
    log,
    element("h2", { textContent: "Display" }),
    screen,
    element("h2", { textContent: "Screenshots" }),
    shoot,
    shots,
  );
  shoot.onclick = () =>
    api(`/v1/jobs/${encodeURIComponent(id)}/screenshots`, { method: "POST" })
      .then((a) => showScreenshot(a, shots))
      .catch(showError);
  followLog(id, log).catch(showError);
  if (status.state === "running") {
    showDisplay(id, screen).catch(showError);
  } else {
    screen.replaceWith(element("p", { textContent: `The job is ${status.state}: it has no display now.` }));
    const report = status.report || {};
    for (const name of report.screenshots || []) {
      const file = name.replace(/^screenshots\//, "");
      api(`/v1/jobs/${encodeURIComponent(id)}/screenshots/${file}`).then((a) => showScreenshot(a, shots)).catch(() => {});
    }
    if (report.screenshot) {
      api(`/v1/jobs/${encodeURIComponent(id)}/screenshot`).then((a) => showScreenshot(a, shots)).catch(() => {});
    }
  }
}

if (!token()) {
  askForToken();
} else {
  (document.body.dataset.page === "job" ? jobPage() : jobList()).catch(showError);
}
