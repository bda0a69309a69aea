"""Row errors: a failure that becomes one ``error`` row in the log, never a crash.

``code`` is a short stable string (the log's ``error_type``; summaries group by it, so never rename
one). ``message`` is a sentence a person can act on: what failed, where (URI, key, row id) and what
to check. Messages pass through :func:`redact` so credentials that slipped into a URI or an
exception text (``user:password@``, presigned-URL signatures, AWS keys) never reach a log.
"""

from __future__ import annotations

import os
import re

# The foundation layer (docs/architecture.md): the standard library only, so every layer (the model
# families on a GPU machine without Ray included) can name a row error code.

# Codes a model family reports (it raises models.base.RowFailure with one of them).
NON_FINITE_OUTPUT = "non_finite_output"
INVALID_INSTRUCTION = "invalid_instruction"
UNSUPPORTED_SIZE = "unsupported_size"
TOO_MANY_IMAGES = "too_many_images"
MODEL_ERROR_CODES = frozenset({NON_FINITE_OUTPUT, INVALID_INSTRUCTION, UNSUPPORTED_SIZE, TOO_MANY_IMAGES})

MISSING_OBJECT = "missing_object"
EMPTY_OBJECT = "empty_object"
CORRUPT_IMAGE = "corrupt_image"
TRUNCATED_IMAGE = "truncated_image"
UNSUPPORTED_FORMAT = "unsupported_format"
TOO_MANY_PIXELS = "too_many_pixels"
EMPTY_INSTRUCTION = "empty_instruction"
INSTRUCTION_TOO_LONG = "instruction_too_long"
UNSAFE_OUTPUT_KEY = "unsafe_output_key"
INVALID_ROW = "invalid_row"
PREPARE_FAILED = "prepare_failed"
READ_FAILED = "read_failed"
WRITE_FAILED = "write_failed"
EDIT_FAILED = "edit_failed"
# Deterministic read failures: the same URI fails the same way on every attempt and every run.
NOT_A_FILE = "not_a_file"  # a folder, FIFO, device, socket or symlink loop where an image file should be
INVALID_URI = "invalid_uri"  # unknown protocol, NUL byte, a bucket name the store refuses
IMAGE_TOO_LARGE = "image_too_large"  # more bytes than input.max_image_bytes
DUPLICATE_ROW = "duplicate_row"  # a second row with an earlier row's output key or explicit id

CODES = frozenset(
    {
        MISSING_OBJECT,
        EMPTY_OBJECT,
        CORRUPT_IMAGE,
        TRUNCATED_IMAGE,
        UNSUPPORTED_FORMAT,
        TOO_MANY_PIXELS,
        EMPTY_INSTRUCTION,
        INSTRUCTION_TOO_LONG,
        UNSAFE_OUTPUT_KEY,
        INVALID_ROW,
        PREPARE_FAILED,
        READ_FAILED,
        WRITE_FAILED,
        EDIT_FAILED,
        NOT_A_FILE,
        INVALID_URI,
        IMAGE_TOO_LARGE,
        DUPLICATE_ROW,
    }
    | MODEL_ERROR_CODES  # reported by model families (non_finite_output, too_many_images, ...)
)


# Final or transient: a *transient* error may well not happen again (a network fault, a store
# answering 503, a worker that ran out of memory), so a later run redoes the row by default
# (``runtime.retry_error_types``). A *final* error is a property of the row or of its input (the
# same bytes, URI and parameters fail the same way every time): a later run skips the row while
# its fingerprint is unchanged; ``--retry-errors TYPE`` redoes it on purpose.
TRANSIENT_CODES = frozenset({READ_FAILED, WRITE_FAILED, EDIT_FAILED})
FINAL_CODES = CODES - TRANSIENT_CODES


# Score errors: a row of the scores log (step1x_batch.rows.scores) that holds no scores. A judge
# answer that cannot be read is final (greedy decoding gives the same answer again); a judge that did
# not answer (timeout, refused request, HTTP error) and an output that could not be read are
# transient, so the next ``score`` run asks again.
JUDGE_UNPARSABLE = "judge_unparsable"  # no JSON answer with the expected scores (malformed, truncated, empty)
JUDGE_OUT_OF_RANGE = "judge_out_of_range"  # a score outside the prompt's 0-10 scale
JUDGE_FAILED = "judge_failed"  # no answer: timeout, connection, HTTP error, engine error
# (plus the reads' final codes: an edit whose output object was deleted stays unscored until asked again)
SCORE_CODES = frozenset({JUDGE_UNPARSABLE, JUDGE_OUT_OF_RANGE, JUDGE_FAILED, READ_FAILED, CORRUPT_IMAGE,
                         MISSING_OBJECT, NOT_A_FILE, INVALID_URI, IMAGE_TOO_LARGE, EMPTY_OBJECT})
TRANSIENT_SCORE_CODES = frozenset({JUDGE_FAILED, READ_FAILED})


def is_transient(code: str) -> bool:
    """Whether a row error of type ``code`` may succeed when simply tried again."""
    if code in SCORE_CODES and code not in CODES:
        return code in TRANSIENT_SCORE_CODES
    if code not in CODES:
        raise ValueError(f"unknown row error code {code!r}")
    return code in TRANSIENT_CODES


class JobRefused(Exception):
    """A problem found before (or instead of) running rows: a bad config, an unreachable store,
    a missing manifest, unsound weights, an output root in use. The job prints the message, one
    sentence that says what to fix, and exits with status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


class RowError(Exception):
    """A failure that becomes one error row (``error_type=code``, ``error_message=message``)."""

    def __init__(self, code: str, message: str) -> None:
        if code not in CODES:
            raise ValueError(f"unknown row error code {code!r}; expected one of {sorted(CODES)}")
        self.code = code
        self.message = redact(message)
        super().__init__(self.code, self.message)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __reduce__(self):  # picklable across Ray workers with the same (code, message)
        return (type(self), (self.code, self.message))


# --- redaction -----------------------------------------------------------------------------------

_MASK = "***"
# scheme://user:password@host  or  scheme://token@host  -> scheme://***@host
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s?#]+)@")
# user:password@host with no scheme in front (botocore quotes an invalid bucket name that way)
_BARE_USERINFO = re.compile(r"(?<![\w.+\-/:@*])[^\s/@:'\"<>]+:[^\s/@'\"<>]+@(?=[A-Za-z0-9\[])")
# query / header / key=value pairs whose value is a secret (presigned URLs, SAS tokens, ...)
_SECRET_PARAMS = (
    r"X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|AWSAccessKeyId|Signature|"
    r"X-Goog-Signature|X-Goog-Credential|GoogleAccessId|Credential|sig|"
    r"access_token|refresh_token|token|password|passwd|secret|"
    r"aws_access_key_id|aws_secret_access_key|aws_session_token|"
    r"AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|"
    r"secret_access_key|session_token|api_key|apikey|Authorization"
)
_SECRET_KV = re.compile(
    rf"(?P<key>\b(?:{_SECRET_PARAMS}))(?P<sep>\s*[=:]\s*['\"]?)(?P<value>[^\s&'\",;)#]+)",
    re.IGNORECASE,
)
# bearer tokens (an Authorization header's value) and OpenAI-style API keys
_BEARER = re.compile(r"\b(?P<kind>Bearer|Basic)\s+[A-Za-z0-9._~+/=\-]{8,}", re.IGNORECASE)
_API_KEY = re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}")
# AWS access key ids (AKIA... long-term, ASIA... temporary) anywhere in text
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b")
_ENV_SECRETS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECURITY_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)


def redact(text: str) -> str:
    """Remove credentials from ``text``: URI userinfo, secret query parameters, AWS key ids, and
    the values of this process's AWS credential variables (when 12+ characters, so that short
    dummy values like ``testing`` do not blank out ordinary words)."""
    if not text:
        return text
    text = str(text)
    for name in _ENV_SECRETS:
        value = os.environ.get(name, "")
        if len(value) >= 12:
            text = text.replace(value, _MASK)
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{_MASK}@", text)
    text = _BARE_USERINFO.sub(f"{_MASK}@", text)
    text = _BEARER.sub(lambda m: f"{m.group('kind')} {_MASK}", text)
    text = _API_KEY.sub(_MASK, text)
    text = _SECRET_KV.sub(lambda m: f"{m.group('key')}{m.group('sep')}{_MASK}", text)
    text = _AWS_KEY_ID.sub(_MASK, text)
    return text


def redact_uri(uri: str) -> str:
    """A URI fit for a message: userinfo masked and the whole query string dropped."""
    uri = redact(str(uri))
    if "://" in uri and "?" in uri:
        uri = uri.split("?", 1)[0] + "?" + _MASK
    return uri
