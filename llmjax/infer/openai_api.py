"""OpenAI's API conventions shared by the server's endpoints (llmjax/infer/server.py: completions, chat;
llmjax/infer/embeddings.py: embeddings): the error body, JSON bodies, field-by-field request checking, the model check.

Every error is OpenAI's JSON body `{"error": {"message", "type", "param", "code"}}` with an HTTP status.
"""

from __future__ import annotations

import json
from collections.abc import Sequence


# --- errors -----------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered as OpenAI's JSON error body with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object (NaN / Infinity are not JSON and are refused)."""

    def refuse_constant(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(raw, parse_constant=refuse_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise invalid(f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object, not {json_type(data)}", code="invalid_json")
    return data


def json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# --- reading a request body -------------------------------------------------------------------------

class Fields:
    """A request's JSON object read field by field: unknown fields are refused, and each wrong type or value
    is one 400 naming the field. null counts as absent (OpenAI's clients send it for unset options)."""

    def __init__(self, data: dict, known: Sequence[str]):
        unknown = [name for name in data if name not in known]
        if unknown:
            raise invalid(f"unrecognized request argument {unknown[0]!r}; this endpoint takes: "
                          f"{', '.join(sorted(known))}", param=unknown[0], code="unknown_field")
        self.data = data

    def get(self, name: str):
        return self.data.get(name)

    def present(self, name: str) -> bool:
        return self.data.get(name) is not None

    def integer(self, name: str, default: int | None, minimum: int | None = None) -> int | None:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(f"{name} must be an integer, not {json_type(value)}", name, "invalid_type")
        if minimum is not None and value < minimum:
            raise invalid(f"{name}={value}: must be >= {minimum}", name)
        return value

    def number(self, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid(f"{name} must be a number, not {json_type(value)}", name, "invalid_type")
        inside = (low < value if low_open else low <= value) and value <= high
        if not inside:
            raise invalid(f"{name}={value}: must be in {'(' if low_open else '['}{low}, {high}]", name)
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise invalid(f"{name} must be true or false, not {json_type(value)}", name, "invalid_type")
        return value

    def string(self, name: str, *, required: bool = False) -> str | None:
        value = self.data.get(name)
        if value is None:
            if required:
                raise invalid(f"{name} is required", name, "missing_field")
            return None
        if not isinstance(value, str):
            raise invalid(f"{name} must be a string, not {json_type(value)}", name, "invalid_type")
        return value

    def unsupported(self, name: str, neutral: tuple, what: str) -> None:
        """A known OpenAI option this server does not implement: only its neutral values are accepted."""
        value = self.data.get(name)
        if value is not None and value not in neutral:
            raise invalid(f"{name}={json.dumps(value)}: {what} is not supported by this server", name, "unsupported")


def check_model(fields: Fields, model_name: str) -> None:
    name = fields.string("model", required=True)
    if name != model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r} (see /v1/models)",
                       param="model", code="model_not_found")
