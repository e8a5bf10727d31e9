"""A JSON API: validates a to-do item and answers with it, numbered; GET lists the fields."""
import itertools

FIELDS = {"title": str, "done": bool}
_numbers = itertools.count(1)


def handle(event, context):
    if event.method == "GET":
        return {"statusCode": 200, "body": {"fields": {name: kind.__name__ for name, kind in FIELDS.items()}}}
    try:
        item = event.json()
    except ValueError:
        return {"statusCode": 400, "body": {"error": "the body must be JSON"}}
    if not isinstance(item, dict):
        return {"statusCode": 400, "body": {"error": "the body must be a JSON object"}}
    problems = [f"{name} must be a {kind.__name__}" for name, kind in FIELDS.items()
                if not isinstance(item.get(name), kind)]
    if problems:
        return {"statusCode": 422, "body": {"error": "; ".join(problems)}}
    return {"statusCode": 201, "body": {"id": next(_numbers), **{k: item[k] for k in FIELDS}}}
