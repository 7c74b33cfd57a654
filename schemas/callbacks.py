"""Deep-Image's completion callback body: the `ProcessResult` it POSTs to `webhooks.complete`."""

from marshmallow import EXCLUDE, Schema, fields, validate

from service.adapters.deepimage import MAX_JOB_ID


class DeepImageCallbackSchema(Schema):
    """`{job, data, result_url, results}`, as Deep-Image posts it."""

    class Meta:
        # Deep-Image documents no versioning: fields it may add later must not break intake.
        unknown = EXCLUDE

    job = fields.String(required=True, validate=validate.Length(min=1, max=MAX_JOB_ID))
    # Null or absent: the job ended without a result (Deep-Image documents only the callback
    # of a complete job); genrelay then asks Deep-Image how it ended.
    result_url = fields.Url(
        load_default=None,
        allow_none=True,
        schemes={"http", "https"},
        require_tld=False,
        validate=validate.Length(max=4096),
    )
    data = fields.Dict(allow_none=True, metadata={"description": "The original request."})
    results = fields.Raw(allow_none=True, metadata={"description": "Undocumented; null so far."})


class CallbackAckSchema(Schema):
    outcome = fields.String(
        validate=validate.OneOf(["accepted", "duplicate", "ignored"]),
        metadata={"description": "accepted, or a no-op: duplicate / ignored (finished)."},
    )
