use schemars::generate::SchemaSettings;
use serde_json::{Value, json};

use qemu_worker_protocol::metadata::{LOG_PATH, PARK_QUERY, PING_PATH, RESULT_PATH, TASK_PATH};

use super::{ApiError, LogReceipt, Ping, TaskReply, TaskResult};

/// The metadata API as an OpenAPI 3.1 document (its schemas are JSON Schema 2020-12,
/// generated from the same types the service uses).
pub fn openapi_document() -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .into_generator();
    // Each call registers the type under components/schemas (the $ref it returns is
    // not needed: the paths below name the components themselves).
    generator.subschema_for::<TaskReply>();
    generator.subschema_for::<TaskResult>();
    generator.subschema_for::<LogReceipt>();
    generator.subschema_for::<Ping>();
    generator.subschema_for::<ApiError>();
    let components: serde_json::Map<String, Value> =
        generator.take_definitions(true).into_iter().collect();
    let reply = |description: &str, schema: &str| {
        json!({"description": description,
               "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
    };
    let error = |description: &str| reply(description, "ApiError");
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "qemu-worker metadata service",
            "version": "1",
            "description": "Served to each VM at http://169.254.169.254/ (and only to that VM). The guest tools fetch the task, stream the log and report the result."
        },
        "servers": [{"url": "http://169.254.169.254"}],
        "paths": {
            (PING_PATH): {"get": {
                "summary": "Liveness check",
                "responses": {"200": reply("The service is up.", "Ping")}
            }},
            (TASK_PATH): {"get": {
                "summary": "The task to run",
                "parameters": [{"name": "park", "in": "query", "required": false,
                    "description": "2: the caller can hold still for a boot snapshot over the agent port (see docs/snapshots.md); any other value is no offer.",
                    "schema": {"type": "string"}}],
                "responses": {
                    "200": reply("The task.", "TaskReply"),
                    "202": error(&format!("Only to a caller that sent {PARK_QUERY}, at most once per VM: hold still for a boot snapshot. The connection is closed. The worker then sends PARK on the agent port (echo it once no connection is held), saves the VM, and sends RESUME (echo it, then ask again); see docs/snapshots.md.")),
                    "503": error("In a VM resumed from a boot snapshot whose RESUME the guest tools have not echoed: the request waited 30 s for it (code held).")
                }
            }},
            (LOG_PATH): {"post": {
                "summary": "Stream output into the job log",
                "description": "The body (any bytes, typically chunked) is appended to the job log as it arrives. Several streams may be open at once (within the VM's connection cap, worker.yml metadata.maxConnections); the log is capped, and a line says so when the cap is reached. A stream that sends nothing for logs.idleSeconds is ended with 408: open a new one for more output.",
                "requestBody": {"required": true, "content": {"application/octet-stream": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}},
                "responses": {
                    "200": reply("The stream ended; this many bytes were received.", "LogReceipt"),
                    "400": error("The stream broke."),
                    "408": error("The stream sent nothing for logs.idleSeconds and was ended (code log-idle); what came before is in the log."),
                    "503": error("The job log is closed.")
                }
            }},
            (RESULT_PATH): {"put": {
                "summary": "Report the command's exit code, once",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TaskResult"}}}},
                "responses": {
                    "200": reply("Recorded (or the same result was already recorded).", "TaskResult"),
                    "400": error("The body is not a TaskResult."),
                    "408": error("The body did not arrive within the head timeout (code slow-body)."),
                    "409": error("A different result was already reported."),
                    "413": error("The body is too large.")
                }
            }}
        },
        "components": {
            "schemas": Value::Object(components),
            "responses": {
                "NotFound": error("No such endpoint (404)."),
                "MethodNotAllowed": error("Wrong method for the endpoint (405, with Allow).")
            }
        }
    })
}
