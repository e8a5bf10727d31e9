"""The gateway's own OpenAPI 3.0 document: OpenFaaS's routes as capfaas serves them."""
from __future__ import annotations

from functools import cache
from typing import Any

from capfaas import __version__

NAME = {"type": "string", "pattern": "^[-a-zA-Z_0-9.]{1,63}$"}
TEXT = {"text/plain": {"schema": {"type": "string"}}}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _response(description: str, content: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, **({"content": content} if content else {})}


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def _system(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "tags": ["system"], "security": [{"basicAuth": []}],
            "responses": {**responses, "401": _response("Basic auth as admin is required", TEXT)}, **extra}


def _invoke(summary: str, asynchronous: bool) -> dict[str, Any]:
    if asynchronous:
        responses = {"202": _response("Accepted; X-Call-Id names the call"),
                     "400": _response("Malformed X-Callback-Url", TEXT),
                     "404": _response("No such function", TEXT),
                     "413": _response("Body larger than the gateway's maximum", TEXT),
                     "429": _response("The asynchronous queue is full; see Retry-After", TEXT)}
    else:
        # A function may answer with any status and content type, so these name what the gateway
        # itself says with each status but do not restrict the content.
        failure = " (the gateway's is a JSON InvocationError: error, type, message, call_id, file, line)"
        responses = {"200": _response("The function's response"),
                     "default": _response("The function's response, with any status it chose"),
                     "400": _response("The client closed the connection before sending the whole body (text)"),
                     "404": _response("No such function (text), or the function's own 404"),
                     "408": _response("The body did not arrive within the body timeout (text)"),
                     "413": _response("Body larger than the gateway's maximum (text)"),
                     "429": _response("Concurrency limit and queue full; see Retry-After (text)"),
                     "500": _response("The handler raised" + failure),
                     "502": _response("The instance crashed, broke a capability rule or sent an invalid header" + failure),
                     "504": _response("The function ran out of time; the message says which limit" + failure)}
    return {"summary": summary, "tags": ["function"],
            "requestBody": {"required": False, "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
            "responses": responses}


def _path_params(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "path", "required": True, "example": "echo" if n == "name" else "extra/path",
             "schema": NAME if n == "name" else {"type": "string"}} for n in names]


EXAMPLE_CODE = "ZGVmIGhhbmRsZShldmVudCwgY29udGV4dCk6CiAgICByZXR1cm4gImhlbGxvXG4iCg=="
"""``def handle(event, context): return "hello\\n"``, base64-encoded."""


@cache
def openapi_document() -> dict[str, Any]:
    invoke_sync = {m: _invoke(f"Invoke a function ({m.upper()})", False) for m in ("get", "post", "put", "delete", "patch")}
    invoke_async = {"post": _invoke("Invoke a function asynchronously", True)}
    return {
        "openapi": "3.0.3",
        "info": {"title": "capfaas gateway", "version": __version__,
                 "description": "OpenFaaS's gateway API, served by capfaas over capability VMs."},
        "paths": {
            "/healthz": {"get": {"summary": "Health", "tags": ["internal"],
                                 "responses": {"200": _response("Healthy", TEXT)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "tags": ["internal"],
                                 "responses": {"200": _response("Prometheus text", TEXT)}}},
            "/openapi.json": {"get": {"summary": "This document", "tags": ["internal"],
                                      "responses": {"200": _response("OpenAPI 3", {"application/json": {"schema": {"type": "object"}}})}}},
            "/system/info": {"get": _system("Gateway and provider information", {"200": _response("Info", _json("GatewayInfo"))})},
            "/system/functions": {
                "get": _system("List deployed functions", {"200": _response("Functions", {
                    "application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/FunctionStatus"}}}})}),
                "post": _system("Deploy a function", {
                    "202": _response("Deployed", _json("DeployResult")),
                    "400": _response("Invalid deployment, or code that does not load (what and where)"),
                    "409": _response("A function of that name exists; use PUT", TEXT),
                    "413": _response("Bundle too large", TEXT)},
                    requestBody={"required": True, "content": _json("FunctionDeployment")}),
                "put": _system("Update a function (a new version)", {
                    "200": _response("Updated", _json("DeployResult")),
                    "400": _response("Invalid deployment, or code that does not load (what and where)"),
                    "404": _response("No such function", TEXT),
                    "413": _response("Bundle too large", TEXT)},
                    requestBody={"required": True, "content": _json("FunctionDeployment")}),
                "delete": _system("Delete a function", {
                    "200": _response("Deleted", TEXT), "400": _response("Malformed request", TEXT),
                    "404": _response("No such function", TEXT)},
                    requestBody={"required": True, "content": _json("DeleteFunctionRequest")}),
            },
            "/system/function/{name}": {"parameters": _path_params("name"), "get": _system(
                "One function's status", {"200": _response("Status", _json("FunctionStatus")),
                                          "404": _response("No such function", TEXT)})},
            "/system/scale-function/{name}": {"parameters": _path_params("name"), "post": _system(
                "Set a function's warm replicas", {"202": _response("Scaling", TEXT), "400": _response("Malformed", TEXT),
                                                   "404": _response("No such function", TEXT)},
                requestBody={"required": True, "content": _json("ScaleServiceRequest")})},
            "/system/secrets": {
                "get": _system("List secret names", {"200": _response("Names", {"application/json": {"schema": {
                    "type": "array", "items": {"$ref": "#/components/schemas/SecretName"}}}})}),
                "post": _system("Create a secret", {"201": _response("Created", TEXT), "400": _response("Malformed", TEXT),
                                                    "409": _response("Exists", TEXT)},
                                requestBody={"required": True, "content": _json("Secret")}),
                "put": _system("Update a secret", {"200": _response("Updated", TEXT), "400": _response("Malformed", TEXT),
                                                   "404": _response("No such secret", TEXT)},
                               requestBody={"required": True, "content": _json("Secret")}),
                "delete": _system("Delete a secret", {"204": _response("Deleted"), "400": _response("Malformed", TEXT),
                                                      "404": _response("No such secret", TEXT)},
                                  requestBody={"required": True, "content": _json("SecretName")}),
            },
            "/system/logs": {"get": _system("Function logs as NDJSON", {
                "200": _response("Log lines", {"application/x-ndjson": {"schema": {"$ref": "#/components/schemas/LogEntry"}}}),
                "400": _response("Malformed query", TEXT)}, parameters=[
                {"name": "name", "in": "query", "required": True, "schema": NAME},
                {"name": "tail", "in": "query", "schema": {"type": "integer"}},
                {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}},
                {"name": "follow", "in": "query", "schema": {"type": "boolean"}}])},
            "/system/files": {"get": _system("List CAP_Files: name, size, owner and grants", {
                "200": _response("CAP_Files", {"application/json": {"schema": {
                    "type": "array", "items": {"$ref": "#/components/schemas/CapFile"}}}})})},
            "/system/files/{name}": {"parameters": _path_params("name"), "delete": _system(
                "Delete a CAP_File, revoking it for every holder",
                {"200": _response("Deleted", TEXT), "400": _response("Malformed name", TEXT),
                 "404": _response("No such CAP_File", TEXT)})},
            "/function/{name}": {"parameters": _path_params("name"), **invoke_sync},
            "/function/{name}/{path}": {"parameters": _path_params("name", "path"), **invoke_sync},
            "/async-function/{name}": {"parameters": _path_params("name"), **invoke_async},
            "/async-function/{name}/{path}": {"parameters": _path_params("name", "path"), **invoke_async},
        },
        "components": {
            "securitySchemes": {"basicAuth": {"type": "http", "scheme": "basic"}},
            "schemas": _schemas(),
        },
    }


def _schemas() -> dict[str, Any]:
    return {
        "GatewayInfo": {"type": "object", "properties": {
            "provider": {"type": "object"}, "version": {"type": "object"}, "arch": {"type": "string"}}},
        "FunctionDeployment": {"type": "object", "required": ["service", "code"], "example": {
            "service": "example", "code": {"files": {"handler.py": EXAMPLE_CODE}, "module": "handler.py"},
            "labels": {"com.openfaas.scale.max": "2"}, "envVars": {"GREETING": "hello"}}, "properties": {
            "service": NAME, "image": {"type": "string"}, "namespace": {"type": "string"},
            "envProcess": {"type": "string"}, "envVars": STRING_MAP, "constraints": {"type": "array", "items": {"type": "string"}},
            "secrets": {"type": "array", "items": NAME}, "labels": STRING_MAP, "annotations": STRING_MAP,
            "limits": {"type": "object"}, "requests": {"type": "object"}, "readOnlyRootFilesystem": {"type": "boolean"},
            "code": {"type": "object", "description": "capfaas: the function's code (files), or a sequence of deployed functions",
                     "properties": {"files": {"type": "object", "additionalProperties": {"type": "string", "format": "byte"}},
                                    "sequence": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 7},
                                    "module": {"type": "string"}, "handler": {"type": "string"},
                                    "signature": {"type": "string", "enum": ["native", "functions-framework", "lambda"]},
                                    "network": {"type": "boolean"}, "timeout": {"type": "number"}}},
            "capFiles": {"type": "array", "description": "capfaas: CAP_Files the function owns", "items": {
                "type": "object", "required": ["name", "size"], "properties": {
                    "name": NAME, "size": {"type": "integer", "minimum": 1}, "contents": {"type": "string", "format": "byte"},
                    "grants": {"type": "object", "additionalProperties": {"type": "string", "enum": ["r", "rw"]}}}}}}},
        "CapFile": {"type": "object", "properties": {
            "name": NAME, "size": {"type": "integer"}, "owner": NAME,
            "readers": {"type": "array", "items": NAME}, "writers": {"type": "array", "items": NAME}}},
        "DeployResult": {"type": "object", "properties": {"name": NAME, "version": {"type": "integer"}}},
        "FunctionStatus": {"type": "object", "required": ["name"], "properties": {
            "name": NAME, "image": {"type": "string"}, "invocationCount": {"type": "number"},
            "replicas": {"type": "number"}, "availableReplicas": {"type": "number"},
            "createdAt": {"type": "string"}, "labels": STRING_MAP, "annotations": STRING_MAP,
            "envVars": STRING_MAP, "secrets": {"type": "array", "items": {"type": "string"}}}},
        "DeleteFunctionRequest": {"type": "object", "required": ["functionName"], "properties": {"functionName": NAME},
                                  "example": {"functionName": "example"}},
        "ScaleServiceRequest": {"type": "object", "required": ["serviceName", "replicas"],
                                "example": {"serviceName": "echo", "replicas": 1}, "properties": {
            "serviceName": NAME, "replicas": {"type": "integer", "minimum": 0}}},
        "SecretName": {"type": "object", "required": ["name"], "properties": {"name": NAME}},
        "Secret": {"type": "object", "required": ["name"], "example": {"name": "api-key", "value": "s3cret"}, "properties": {
            "name": NAME, "value": {"type": "string"}, "rawValue": {"type": "string", "format": "byte"}}},
        "LogEntry": {"type": "object", "properties": {k: {"type": "string"} for k in
                                                      ("name", "namespace", "instance", "timestamp", "text")}},
        "InvocationError": {"type": "object", "required": ["error", "type", "message", "call_id"], "properties": {
            "error": {"type": "string"}, "type": {"type": "string"}, "message": {"type": "string"},
            "call_id": {"type": "string"}, "file": {"type": "string"}, "line": {"type": "integer"}}},
    }
