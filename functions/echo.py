"""Echo: returns the request as the function saw it (method, path, query, headers, body)."""


def handle(event, context):
    return {
        "statusCode": 200,
        "body": {
            "method": event.method,
            "path": event.path,
            "query": event.query,
            "headers": event.headers,
            "body": event.text,
        },
    }
