"""RFC 9457 problem details, the one error format of the API."""

from marshmallow import Schema, fields


class FieldErrorSchema(Schema):
    field = fields.String(required=True, metadata={"description": "Dotted path of the field"})
    message = fields.String(required=True)


class ProblemSchema(Schema):
    type = fields.String(required=True)
    title = fields.String(required=True)
    status = fields.Integer(required=True)
    detail = fields.String()
    errors = fields.List(fields.Nested(FieldErrorSchema))
