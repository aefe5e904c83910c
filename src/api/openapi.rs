//! The worker API as an OpenAPI 3.1 document (schemas/worker-api.openapi.json): its
//! schemas are generated from the types the handlers send and the clients read.

use schemars::generate::SchemaSettings;
use serde_json::{Value, json};

use super::model::{ApiError, Canceled, Health, JobPage, Readiness, Released, Submitted};
use super::{MAX_DEADLINE_SECONDS, MAX_PAGE, MAX_PAYLOAD};
use crate::job::ArtifactRecord;
use crate::queue::JobStatus;

/// The document, as `qemu-worker schema` writes it.
pub fn openapi_document() -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .into_generator();
    // Each call registers the type under components/schemas; the paths name them.
    generator.subschema_for::<Health>();
    generator.subschema_for::<Readiness>();
    generator.subschema_for::<JobPage>();
    generator.subschema_for::<JobStatus>();
    generator.subschema_for::<Submitted>();
    generator.subschema_for::<Canceled>();
    generator.subschema_for::<Released>();
    generator.subschema_for::<ArtifactRecord>();
    generator.subschema_for::<ApiError>();
    let components: serde_json::Map<String, Value> =
        generator.take_definitions(true).into_iter().collect();
    let schema = |name: &str| json!({"$ref": format!("#/components/schemas/{name}")});
    let reply = |description: &str, name: &str| {
        json!({"description": description,
               "content": {"application/json": {"schema": schema(name)}}})
    };
    let error = |description: &str| reply(description, "ApiError");
    let shared = |name: &str| json!({"$ref": format!("#/components/responses/{name}")});
    let job_id = json!({"name": "id", "in": "path", "required": true,
        "description": "The job's id, as submit printed it.", "schema": {"type": "string"}});
    let range = json!({"name": "Range", "in": "header", "required": false,
        "description": "One range: bytes=A-B, bytes=A- or bytes=-N.",
        "schema": {"type": "string"}});
    let file_headers = json!({
        "Content-Length": {"schema": {"type": "integer"}},
        "Accept-Ranges": {"schema": {"const": "bytes"}},
    });
    let file = |description: &str, media: &str, sha256: bool| {
        let mut headers = file_headers.clone();
        if sha256 {
            headers["X-Artifact-Sha256"] = json!({"description": "The sha256 of the whole file, as the report lists it.", "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}});
        }
        json!({
            "200": {"description": description, "headers": headers.clone(),
                    "content": {media: {"schema": {"type": "string", "contentMediaType": media}}}},
            "206": {"description": "The range asked for, with Content-Range.",
                    "headers": headers, "content": {media: {"schema": {"type": "string"}}}},
        })
    };
    // The answers every job read may give besides its own.
    let job_errors = |extra: Value| {
        let mut responses = json!({
            "401": shared("Unauthenticated"),
            "403": shared("Forbidden"),
            "404": error("No such job (code no-such-job), or the job has no such file (no-such-artifact, no-screenshot)."),
            "405": shared("MethodNotAllowed"),
            "503": shared("QueueUnavailable"),
        });
        for (status, answer) in extra.as_object().into_iter().flatten() {
            responses[status] = answer.clone();
        }
        responses
    };
    let holder_errors = json!({
        "409": error("The job is pending or running: its files are collected when it ends (code not-ended)."),
        "410": error("This worker ran the job but no longer holds the file (code file-gone)."),
        "502": error("Another worker ran the job and recorded no API address (code holder-unknown) or does not answer (holder-unreachable); the message names it."),
    });
    let with = |mut base: Value, more: &Value| {
        for (status, answer) in more.as_object().into_iter().flatten() {
            base[status] = answer.clone();
        }
        base
    };
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "qemu-worker API",
            "version": "1",
            "description": "Served by `qemu-worker serve` where worker.yml api.listen says (docs/api.md). In a PostgreSQL pool any worker answers for any job: a job's log, artifacts and screenshot are passed on from the worker that ran it."
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {
                "summary": "The process serves.",
                "security": [],
                "responses": {"200": reply("Always.", "Health"), "405": shared("MethodNotAllowed")}
            }},
            "/readyz": {"get": {
                "summary": "The queue answers, the image cache takes a file and the accelerator is decided.",
                "security": [],
                "responses": {
                    "200": reply("Ready.", "Readiness"),
                    "503": reply("Not ready: each check says why.", "Readiness"),
                    "405": shared("MethodNotAllowed")
                }
            }},
            "/metrics": {"get": {
                "summary": "Prometheus metrics (scope read).",
                "responses": {
                    "200": {"description": "OpenMetrics when Accept asks for it, else the text format 0.0.4.",
                            "content": {
                                "text/plain; version=0.0.4; charset=utf-8": {"schema": {"type": "string"}},
                                "application/openmetrics-text; version=1.0.0; charset=utf-8": {"schema": {"type": "string"}}
                            }},
                    "401": shared("Unauthenticated"), "403": shared("Forbidden"), "405": shared("MethodNotAllowed")
                }
            }},
            "/v1/jobs": {
                "get": {
                    "summary": "Jobs, newest first, a page at a time (scope read).",
                    "parameters": [
                        {"name": "state", "in": "query", "required": false, "schema": schema("JobState")},
                        {"name": "limit", "in": "query", "required": false,
                         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": super::DEFAULT_PAGE}},
                        {"name": "after", "in": "query", "required": false,
                         "description": "The previous page's next: the jobs submitted before this one (in any state).", "schema": {"type": "string"}}
                    ],
                    "responses": {
                        "200": reply("A page.", "JobPage"),
                        "400": error("A parameter out of range or unknown, or an after that is no job (code bad-query)."),
                        "401": shared("Unauthenticated"), "403": shared("Forbidden"),
                        "405": shared("MethodNotAllowed"), "503": shared("QueueUnavailable")
                    }
                },
                "post": {
                    "summary": "Submit a job (scope submit); its payload is checked when a worker claims it.",
                    "parameters": [
                        {"name": "priority", "in": "query", "required": false, "schema": {"type": "integer", "format": "int32", "default": 0}},
                        {"name": "maxRuns", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": u32::MAX, "default": 3}},
                        {"name": "deadline", "in": "query", "required": false,
                         "description": "Seconds from now by which the job must have ended.",
                         "schema": {"type": "integer", "minimum": 0, "maximum": MAX_DEADLINE_SECONDS}}
                    ],
                    "requestBody": {"required": true, "description": format!("The job payload, YAML or JSON (docs/payload.md), at most {MAX_PAYLOAD} bytes of UTF-8."),
                        "content": {"application/yaml": {"schema": {"type": "string"}},
                                    "application/json": {"schema": {"type": "string"}}}},
                    "responses": {
                        "201": reply("Queued.", "Submitted"),
                        "400": error("A bad parameter (bad-query), an empty or non-UTF-8 body (empty-payload, not-utf8), or one that broke off (bad-body)."),
                        "401": shared("Unauthenticated"), "403": shared("Forbidden"),
                        "405": shared("MethodNotAllowed"),
                        "413": error("The payload is too large (code too-large)."),
                        "503": shared("QueueUnavailable")
                    }
                }
            },
            "/v1/jobs/{id}": {"get": {
                "summary": "A job's state and result report, as `status --json` prints it (scope read).",
                "parameters": [job_id],
                "responses": job_errors(json!({"200": reply("The job.", "JobStatus")}))
            }},
            "/v1/jobs/{id}/cancel": {"post": {
                "summary": "Cancel a job (scope submit).",
                "parameters": [job_id],
                "responses": job_errors(json!({"200": reply("What became of it.", "Canceled")}))
            }},
            "/v1/jobs/{id}/log": {"get": {
                "summary": "The job log of its latest run (scope read); with follow, streamed until the job ends.",
                "parameters": [
                    job_id,
                    {"name": "offset", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 0, "default": 0}},
                    {"name": "follow", "in": "query", "required": false, "schema": {"type": "boolean", "default": false}}
                ],
                "responses": job_errors(json!({
                    "200": {"description": "The log from offset.",
                            "headers": {"X-Qemu-Worker-Run": {"description": "The run whose log this is.", "schema": {"type": "integer"}}},
                            "content": {"text/plain; charset=utf-8": {"schema": {"type": "string"}}}},
                    "400": error("A bad offset or follow (code bad-query)."),
                    "502": holder_errors["502"].clone()
                }))
            }},
            "/v1/jobs/{id}/artifacts": {"get": {
                "summary": "The artifacts the job's result report lists (scope read).",
                "parameters": [job_id],
                "responses": job_errors(json!({
                    "200": {"description": "The list.", "content": {"application/json": {"schema": {"type": "array", "items": schema("ArtifactRecord")}}}},
                    "409": holder_errors["409"].clone()
                }))
            }},
            "/v1/jobs/{id}/artifacts/{name}": {"get": {
                "summary": "One listed artifact (scope read).",
                "parameters": [
                    job_id,
                    {"name": "name", "in": "path", "required": true,
                     "description": "The stored name (public/logs/a.txt): its slashes separate path segments, each %-decoded.",
                     "schema": {"type": "string"}},
                    range
                ],
                "responses": job_errors(with(with(file("The file, with the Content-Type its report lists.", "application/octet-stream", true), &holder_errors), &json!({
                    "400": error("A broken %-escape in the name (code bad-path)."),
                    "416": error("The range is outside the file (code bad-range).")
                })))
            }},
            "/v1/jobs/{id}/release": {"post": {
                "summary": "Let a failed job's VM kept for debugging go (scope submit); passed on to the worker that keeps it.",
                "parameters": [job_id],
                "responses": job_errors(json!({
                    "200": reply("It is being torn down.", "Released"),
                    "409": error("The job has no VM kept (code not-kept)."),
                    "502": holder_errors["502"].clone()
                }))
            }},
            "/v1/jobs/{id}/screenshots": {"post": {
                "summary": "A screenshot of a running job's VM, taken now (scope read); passed on to the worker that runs it.",
                "parameters": [job_id],
                "responses": job_errors(json!({
                    "200": {"description": "The PNG.", "content": {"image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}}}},
                    "409": error("The job has no VM running now (code not-running: pending, starting, ended), or its machine has no display (no-display)."),
                    "502": holder_errors["502"].clone(),
                    "503": error("The VM did not give a screenshot (code screenshot-failed), or the queue does not answer (queue-unavailable).")
                }))
            }},
            "/v1/jobs/{id}/shell": {"get": {
                "summary": "A shell in a running (or kept) job's guest, as a WebSocket (scope admin; docs/api.md says its messages); passed on to the worker that runs the job.",
                "parameters": [job_id,
                    {"name": "tty", "in": "query", "required": false, "description": "A terminal of its own (default false: pipes).", "schema": {"type": "boolean"}},
                    {"name": "rows", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 24}},
                    {"name": "cols", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 80}},
                    {"name": "term", "in": "query", "required": false, "description": "TERM for the shell.", "schema": {"type": "string", "maxLength": 64}},
                    {"name": "command", "in": "query", "required": false, "description": "The command, once per argument, run as it is; without, the image's login shell.", "schema": {"type": "array", "items": {"type": "string"}, "maxItems": 256}, "style": "form", "explode": true}],
                "responses": job_errors(json!({
                    "101": {"description": "Switching to the WebSocket."},
                    "400": error("Not a WebSocket upgrade (code not-websocket), or a bad parameter (bad-query, naming it)."),
                    "409": error("The job has no VM running now (code not-running), or its guest gives no shell (shell-failed: tools too old, too many shells)."),
                    "502": holder_errors["502"].clone()
                }))
            }},
            "/v1/jobs/{id}/display": {"get": {
                "summary": "A running (or kept) job's screen as a WebSocket of RFB (what noVNC speaks; scope read: view-only, admin: with input); passed on to the worker that runs the job. Browsers may give the token as a subprotocol bearer.TOKEN.",
                "parameters": [job_id],
                "responses": job_errors(json!({
                    "101": {"description": "Switching to the WebSocket."},
                    "400": error("Not a WebSocket upgrade (code not-websocket)."),
                    "409": error("The job has no VM running now (code not-running), or its machine has no display (no-display)."),
                    "502": holder_errors["502"].clone()
                }))
            }},
            "/ui": {"get": {
                "summary": "The web page: the job list (it calls this API with the user's token).",
                "security": [],
                "responses": {"200": {"description": "The page.", "content": {"text/html": {"schema": {"type": "string"}}}}}
            }},
            "/ui/job": {"get": {
                "summary": "The web page of one job: status, live log, screenshots, display.",
                "security": [],
                "parameters": [{"name": "id", "in": "query", "required": true, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The page.", "content": {"text/html": {"schema": {"type": "string"}}}}}
            }},
            "/v1/jobs/{id}/screenshots/{name}": {"get": {
                "summary": "A screenshot the run took while its command ran (worker.yml debug.screenshotEverySeconds), by the name its report's screenshots list ends with (every-0001.png); scope read.",
                "parameters": [job_id, {"name": "name", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^every-[0-9]{4}\\.png$"}}, range],
                "responses": job_errors(with(with(file("The PNG.", "image/png", false), &holder_errors), &json!({
                    "416": error("The range is outside the file (code bad-range).")
                })))
            }},
            "/v1/jobs/{id}/screenshot": {"get": {
                "summary": "The run's final screenshot (scope read).",
                "parameters": [job_id, range],
                "responses": job_errors(with(with(file("The PNG.", "image/png", false), &holder_errors), &json!({
                    "416": error("The range is outside the file (code bad-range).")
                })))
            }}
        },
        "components": {
            "schemas": Value::Object(components),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                "description": "A token listed in worker.yml api.tokens by its sha256, with a scope: read < submit < admin."}},
            "responses": {
                "Unauthenticated": {"description": "No bearer token, or one not listed (code unauthenticated), with WWW-Authenticate: Bearer.",
                    "headers": {"WWW-Authenticate": {"schema": {"const": "Bearer"}}},
                    "content": {"application/json": {"schema": schema("ApiError")}}},
                "Forbidden": {"description": "The token's scope is too low (code forbidden; the message names the token and both scopes).",
                    "content": {"application/json": {"schema": schema("ApiError")}}},
                "MethodNotAllowed": {"description": "Another method than the one documented (code method-not-allowed, with Allow).",
                    "headers": {"Allow": {"schema": {"type": "string"}}},
                    "content": {"application/json": {"schema": schema("ApiError")}}},
                "QueueUnavailable": {"description": "The queue database does not answer (code queue-unavailable).",
                    "content": {"application/json": {"schema": schema("ApiError")}}}
            }
        }
    })
}
