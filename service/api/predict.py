"""POST /predict and /v1/predict: the original contract, one question in, one answer out."""

import json
import uuid

from flask import Blueprint, request

from service.admission.access import caller
from service.api import generation
from service.inference.model import chat_messages
from service.inputs import filtering
from service.inputs.schemas import PredictRequest, read
from service.state import state

bp = Blueprint("predict", __name__)
PATHS = ("/predict", "/v1/predict")


@bp.post(PATHS[0])
@bp.post(PATHS[1])
def predict():
    """Answer one question with the model."""
    body = read(PredictRequest)
    ids, params, echo = prepare(body)
    params = generation.fit_deadline(state().engine, state().settings, params, ids, body.max_new_tokens)
    return prediction(generation.answer(ids, params), echo)


def prepare(body):
    """A checked PredictRequest as (prompt ids, parameters, what the answer echoes: the cleaned question and
    system prompt); APIError 400/403/422 as for a live request (batch lines go through here too)."""
    settings, engine = state().settings, state().engine
    question = filtering.clean_text("question", body.question, settings.max_question_chars)
    system_prompt = settings.default_system_prompt if body.system_prompt is None else \
        filtering.clean_text("system_prompt", body.system_prompt, settings.max_question_chars, allow_empty=True)
    if body.system_prompt is not None:
        filtering.check_allowed_prompt(system_prompt, caller().get("system_prompts"))
    filtering.check_policy(state().policy, {"system_prompt": system_prompt, "question": question},
                           whole="question")
    params = generation.resolve_params(settings, body.max_new_tokens, body.temperature, body.top_p)
    ids = generation.prompt_ids(engine, chat_messages(question, system_prompt), settings, params.max_new_tokens)
    return ids, params, {"input": question, "system_prompt": system_prompt}


def prediction(result, echo):
    """The /predict answer of a finished generation."""
    return {"id": f"pred-{uuid.uuid4().hex}", "model": state().settings.model_name, **echo,
            "response": result.text, "success": True, "usage": generation.usage(result),
            "finish_reason": result.finish_reason}


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
