use schemars::generate::SchemaSettings;
use serde_json::{Value, json};

use qemu_worker_protocol::metadata::{
    GUEST_TOOLS_PATH, GUEST_TOOLS_SHA256_HEADER, LOG_PATH, PARK_QUERY, PING_PATH, RESULT_PATH,
    TASK_PATH,
};

use super::datasource::TOKEN_PATH;

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
    let text = |description: &str| {
        json!({"description": description,
               "content": {"text/plain; charset=utf-8": {"schema": {"type": "string"}}}})
    };
    let off = || {
        error("No such file, or this VM is offered no cloud-init datasource (code cloud-init-off).")
    };
    let wrong_method = || error("Another method than the one documented (with Allow).");
    // The EC2 reads: IMDSv2's rules (docs/metadata.md).
    let token_header = json!({"name": "X-aws-ec2-metadata-token", "in": "header", "required": false,
        "description": "A session token from PUT /latest/api/token. Needed once this VM was issued one (X-metadata-token is read too).",
        "schema": {"type": "string"}});
    let version = json!({"name": "version", "in": "path", "required": true,
        "description": "latest, 1.0 or a date (YYYY-MM-DD): every version serves the same tree.",
        "schema": {"type": "string", "pattern": "^(latest|1\\.0|[0-9]{4}-[0-9]{2}-[0-9]{2})$"}});
    let ec2_read = |summary: &str, ok: Value| {
        json!({"get": {
            "summary": summary,
            "parameters": [version.clone(), token_header.clone()],
            "responses": {
                "200": ok,
                "401": error("A session token was issued in this VM and this request has none, or its token is unknown or expired (code token)."),
                "403": error("The request carries X-Forwarded-For (code forwarded)."),
                "404": off(),
                "405": wrong_method()
            }
        }})
    };
    let nocloud = |summary: &str| {
        json!({"get": {
            "summary": summary,
            "responses": {"200": text("The file."), "404": off(), "405": wrong_method()}
        }})
    };
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "qemu-worker metadata service",
            "version": "1",
            "description": "Served to each VM at http://169.254.169.254/ (and only to that VM). The guest tools fetch the task, stream the log and report the result. A VM offered cloud-init (machine.cloudInit) also finds its NoCloud seed and the EC2 paths here, and the guest tools binary."
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
                "requestBody": {"required": false, "description": "An empty or missing body appends nothing (200 with bytes 0).", "content": {"application/octet-stream": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}},
                "responses": {
                    "200": reply("The stream ended; this many bytes were received.", "LogReceipt"),
                    "400": error("The stream broke."),
                    "408": error("The stream sent nothing for logs.idleSeconds and was ended (code log-idle); what came before is in the log."),
                    "503": error("The job log is closed.")
                }
            }},
            (GUEST_TOOLS_PATH): {"get": {
                "summary": "The static guest tools binary built with this worker",
                "description": "What the default user-data installs in a stock cloud image (docs/images.md).",
                "responses": {
                    "200": {"description": "The binary.",
                        "headers": {(GUEST_TOOLS_SHA256_HEADER): {"description": "Its sha256, lowercase hex (also in the user-data).", "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}},
                        "content": {"application/octet-stream": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}},
                    "404": off(),
                    "405": wrong_method()
                }
            }},
            "/nocloud/meta-data": nocloud("NoCloud meta-data (YAML: instance-id, local-hostname)"),
            "/nocloud/user-data": nocloud("NoCloud user-data: a MIME multipart of the worker's part (starts the guest tools) and the payload's userData"),
            "/nocloud/vendor-data": nocloud("NoCloud vendor-data (empty)"),
            "/nocloud/network-config": nocloud("NoCloud network-config, version 2 (DHCP on the first NIC, or 169.254.169.15/24 on a tap network)"),
            (TOKEN_PATH): {"put": {
                "summary": "Open an IMDSv2 session",
                "description": "From then on every EC2 read in this VM needs a live token. A VM keeps at most 64 live tokens (the one that expires first is dropped).",
                "parameters": [{"name": "X-aws-ec2-metadata-token-ttl-seconds", "in": "header", "required": true,
                    "description": "The token's lifetime (X-metadata-token-ttl-seconds is read too).",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 21600}}],
                "responses": {
                    "200": {"description": "The token.",
                        "headers": {"X-aws-ec2-metadata-token-ttl-seconds": {"description": "Its lifetime.", "schema": {"type": "integer"}}},
                        "content": {"text/plain; charset=utf-8": {"schema": {"type": "string"}}}},
                    "400": error("No TTL header, or not an integer from 1 to 21600 (code ttl)."),
                    "403": error("The request carries X-Forwarded-For (code forwarded)."),
                    "404": off(),
                    "405": wrong_method()
                }
            }},
            "/{version}/meta-data/": ec2_read("EC2 meta-data: the list of keys", text("Keys, one per line; a trailing / marks a directory.")),
            "/{version}/meta-data/{key}": {"get": {
                "summary": "One EC2 meta-data key",
                "parameters": [version.clone(), token_header.clone(),
                    {"name": "key", "in": "path", "required": true, "schema": {"type": "string", "enum": ["hostname", "instance-id", "instance-type", "local-hostname", "local-ipv4", "mac", "placement"]}}],
                "responses": {
                    "200": text("The value."),
                    "401": error("A session token was issued in this VM and this request has none, or its token is unknown or expired (code token)."),
                    "403": error("The request carries X-Forwarded-For (code forwarded)."),
                    "404": off(),
                    "405": wrong_method()
                }
            }},
            "/{version}/user-data": ec2_read("EC2 user-data (the same as NoCloud's)", text("The user-data.")),
            "/{version}/dynamic/instance-identity/document": ec2_read("EC2 instance identity document",
                json!({"description": "The document.", "content": {"application/json": {"schema": {"type": "object",
                    "required": ["instanceId", "instanceType", "privateIp", "region", "availabilityZone", "architecture"],
                    "properties": {"instanceId": {"type": "string"}, "instanceType": {"type": "string"}, "privateIp": {"type": "string"},
                        "region": {"type": "string"}, "availabilityZone": {"type": "string"}, "architecture": {"type": "string"}}}}}})),
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
