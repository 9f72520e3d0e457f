"""POST /predict and /v1/predict: the original contract, one question in, one answer out.

Without a `model` (or with "auto") the routing rules pick the model by the
question (service.serving.models); the answer's `model` names the one that answered. `response` is the
whole text, `reasoning` and `answer` its parts, `final_answer` the answer's last `\\boxed{}`, and with an
`expected_answer`, `correct` says whether they are equal (service.serving.answers).
"""

import json

from flask import Blueprint, request

from service.api import accounting, attachments, client
from service.api.body import read
from service.errors import UnsupportedMedia
from service.inputs.schemas import PredictRequest, parse
from service.serving import pipeline, prompts, shapes
from service.state import state

bp = Blueprint("predict", __name__)
PATHS = ("/predict", "/v1/predict")


@bp.post(PATHS[0])
@bp.post(PATHS[1])
def predict():
    """Answer one question with the model: a JSON body, or a multipart form with a document to read."""
    app, job = state(), accounting.begin()
    if request.mimetype == "multipart/form-data":
        attachments.allow_document_body()  # a JSON body holds no document: the small limit stays
        fields, document = attachments.from_form(app, job)
        body = parse(PredictRequest, fields)
    elif request.is_json:
        body, document = read(PredictRequest), None
    else:
        raise UnsupportedMedia("Content-Type must be application/json, or multipart/form-data (with a file: "
                               "curl -F file=@problem.pdf)", "unsupported_media_type")
    prompts.predict(app, job, body, document)
    hit = pipeline.cached(app, job)
    if hit is None:
        pipeline.fit_deadline(app, job)
    result = hit if hit is not None else pipeline.answer(app, job, client.gone)
    return shapes.prediction(app, job, result)


def _flag_failure(response):
    """The original contract adds "success": false beside every error on these paths."""
    if request.path in PATHS and response.status_code >= 400 and response.is_json:
        body = response.get_json()
        if isinstance(body, dict) and "error" in body:
            body["success"] = False
            response.set_data(json.dumps(body, separators=(",", ":")) + "\n")
    return response


def init_app(app):
    app.register_blueprint(bp)
    app.after_request(_flag_failure)
