"""POST /predict and /v1/predict: the original contract, one question in, one answer out."""

import json
import uuid

from flask import Blueprint, current_app, request

from service import filtering, generate, quotas
from service.access import caller
from service.model import chat_messages
from service.schemas import PredictRequest, decode_body, parse

bp = Blueprint("predict", __name__)
PATHS = ("/predict", "/v1/predict")


@bp.post(PATHS[0])
@bp.post(PATHS[1])
def predict():
    """Answer one question with the model."""
    settings = current_app.extensions["vibethinker.settings"]
    engine = current_app.extensions["vibethinker.engine"]
    body = parse(PredictRequest, decode_body(request.get_data(cache=False), request.is_json))
    question = filtering.clean_text("question", body.question, settings.max_question_chars)
    system_prompt = settings.default_system_prompt if body.system_prompt is None else \
        filtering.clean_text("system_prompt", body.system_prompt, settings.max_question_chars, allow_empty=True)
    if body.system_prompt is not None:
        filtering.check_allowed_prompt(system_prompt, caller().get("system_prompts"))
    filtering.check_policy(current_app.extensions["vibethinker.policy"],
                           {"system_prompt": system_prompt, "question": question})
    params = generate.resolve_params(settings, body.max_new_tokens, body.temperature, body.top_p)
    ids = generate.prompt_ids(engine, chat_messages(question, system_prompt), settings, params.max_new_tokens)
    with quotas.admit(caller(), len(ids), params.max_new_tokens, settings.request_deadline_s) as ticket:
        result = generate.complete(engine, ids, params, settings)
        ticket.complete(result)
    return {"id": f"pred-{uuid.uuid4().hex}", "model": settings.model_name, "input": question,
            "system_prompt": system_prompt, "response": result.text, "success": True,
            "usage": generate.usage(result), "finish_reason": result.finish_reason}


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
