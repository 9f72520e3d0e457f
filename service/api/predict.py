"""POST /predict and /v1/predict: the original contract, one question in, one answer out.

Without a `model` (or with "auto") the routing rules pick the model by the
question (service.api.models); the answer's `model` names the one that answered.
"""

import json
import uuid

from flask import Blueprint, request

from service.admission.access import caller
from service.api import attachments, generation, models
from service.errors import APIError
from service.inference.model import chat_messages
from service.inputs import filtering, language
from service.inputs.schemas import PredictRequest, parse, read
from service.records import accounting
from service.state import state

bp = Blueprint("predict", __name__)
PATHS = ("/predict", "/v1/predict")


@bp.post(PATHS[0])
@bp.post(PATHS[1])
def predict():
    """Answer one question with the model: a JSON body, or a multipart form with a document to read."""
    if request.mimetype == "multipart/form-data":
        attachments.allow_document_body()  # a JSON body holds no document: the small limit stays
        fields, document = attachments.from_form()
        body = parse(PredictRequest, fields)
    elif request.is_json:
        body, document = read(PredictRequest), None
    else:
        raise APIError(415, "Content-Type must be application/json, or multipart/form-data (with a file: "
                       "curl -F file=@problem.pdf)", "unsupported_media_type")
    job, echo = prepare(body, document)
    record = accounting.current()
    record.model, record.hint = job.served.name, job.hint
    hit = generation.cached(job.served, job.ids, job.params)
    if hit is not None:
        return prediction(hit, echo, job.served.name)
    params = generation.fit_deadline(job.served.engine, state().settings, job.params, job.ids, job.asked)
    return prediction(generation.answer(job.served, job.ids, params), echo, job.served.name)


def prepare(body, document=None):
    """A checked PredictRequest, and the Document read from its file if it had one, as (generation.Prepared,
    what the answer echoes: the cleaned question, system prompt, document, hint); APIError 400/403/404/422/503
    as for a live request (batch lines go through here too). The model sees the document's text, then the
    question."""
    settings = state().settings
    question = filtering.clean_text("question", body.question, settings.max_question_chars,
                                    allow_empty=document is not None)
    text = None  # the document's, cleaned like a question
    if document is not None:
        text = filtering.clean_text("file", attachments.plain(document.text), settings.max_question_chars)
        whole = f"{text}\n\n{question}" if question else text
    else:
        whole = question
    system_prompt = settings.default_system_prompt if body.system_prompt is None else \
        filtering.clean_text("system_prompt", body.system_prompt, settings.max_question_chars, allow_empty=True)
    if body.system_prompt is not None:
        filtering.check_allowed_prompt(system_prompt, caller().get("system_prompts"))
    filtering.check_policy(state().policy, {"system_prompt": system_prompt, "question": question,
                                            **({"file": text} if text is not None else {})}, whole="question")
    served = models.pick(body.model, whole)
    params = generation.resolve_params(settings, body.max_new_tokens, body.temperature, body.top_p)
    ids = generation.prompt_ids(served.engine, chat_messages(whole, system_prompt), settings,
                                params.max_new_tokens)
    hint = language.english_hint(whole)
    echo = {"input": question, "system_prompt": system_prompt, "hint": hint}
    if document is not None:
        echo["document"] = document.summary(text)
    return generation.Prepared(served, ids, params, "max_new_tokens", body.max_new_tokens, hint), echo


def prediction(result, echo, model):
    """The /predict answer of a finished generation by `model`."""
    return {"id": f"pred-{uuid.uuid4().hex}", "model": model, **echo,
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
