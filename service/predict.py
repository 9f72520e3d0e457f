"""POST /predict and /v1/predict: the original contract, one question in, one answer out."""

import uuid

from flask import Blueprint, current_app, request

from service import generate
from service.model import chat_messages
from service.schemas import PredictRequest, check_text, decode_body, parse

bp = Blueprint("predict", __name__)
PATHS = ("/predict", "/v1/predict")


@bp.post(PATHS[0])
@bp.post(PATHS[1])
def predict():
    """Answer one question with the model."""
    settings = current_app.extensions["vibethinker.settings"]
    engine = current_app.extensions["vibethinker.engine"]
    body = parse(PredictRequest, decode_body(request.get_data(cache=False), request.is_json))
    question = check_text("question", body.question, settings.max_question_chars)
    system_prompt = settings.default_system_prompt if body.system_prompt is None else \
        check_text("system_prompt", body.system_prompt, settings.max_question_chars, allow_empty=True)
    params = generate.resolve_params(settings, body.max_new_tokens, body.temperature, body.top_p)
    ids = generate.prompt_ids(engine, chat_messages(question, system_prompt), settings)
    result = generate.complete(engine, ids, params, settings)
    return {"id": f"pred-{uuid.uuid4().hex}", "model": settings.model_name, "input": question,
            "system_prompt": system_prompt, "response": result.text, "success": True,
            "usage": generate.usage(result), "finish_reason": result.finish_reason}


def _flag_failure(response):
    """The original contract adds "success": false beside every error on these paths."""
    if request.path in PATHS and response.status_code >= 400 and response.is_json:
        body = response.get_json()
        if isinstance(body, dict) and "error" in body:
            body["success"] = False
            response.set_data(current_app.json.dumps(body))
    return response


def init_app(app):
    app.register_blueprint(bp)
    app.after_request(_flag_failure)
