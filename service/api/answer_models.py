"""The shapes of the generation routes' answers (/predict, chat completions), as pydantic models: their
OpenAPI schemas (service.api.contract), beside the other routes' (service.api.responses)."""

from typing import Literal

from pydantic import BaseModel, Field

FINAL_ANSWER = "The answer part's last \\boxed{} (or \\fbox{}) content, braces balanced; null when it has none."
CORRECT = ("Only with expected_answer: whether final_answer equals it (math-verify: 1/2, 0.5 and \\frac{1}{2} "
           "are equal); null when it cannot be decided in time or read (correct_reason says why).")
CORRECT_REASON = "Only when correct is null: why the check could not decide."
ENDED = ("Why the engine ended the thinking early (fed in a short closing sentence and the end tag, so the "
         "answer follows, capped at answer_tokens): budget (thinking_token_budget or reasoning_effort reached), "
         "length (max_tokens would leave no room for an answer), deadline (nor would the deadline, at the measured "
         "speed), loop (the thinking repeated one span); null when it was not.")
Ended = Literal["budget", "length", "deadline", "loop"] | None


class Counts(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="Every choice's generated tokens, forced ones included.")
    total_tokens: int


CACHED = ("Of the prompt's: read from the engine's prefix cache (an earlier prompt that began the same way, "
          "within prefix_cache_scope) instead of prefilled; all of them for an answer from the response cache.")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description=CACHED)


class Usage(Counts):
    forced_tokens: int = Field(description="Of the completion's: fed in by the engine to end a thinking early.")
    cached_tokens: int = Field(description=CACHED)
    prompt_tokens_details: PromptTokensDetails = Field(description="The same cached_tokens where OpenAI's "
                                                       "usage has them (as on chat).")


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = Field(description="Completion tokens of the thinking, its end tag included.")
    forced_tokens: int = Field(description="Of the completion's: fed in by the engine to end a thinking early.")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(description="The answer's tokens (every token with reasoning_format "
                                        "\"none\").")
    refusal: None
    reasoning_content: list[TokenLogprob] | None = Field(None, description="Not OpenAI's: the thinking's tokens, "
                                                         "its tags and a forced closing included.")


class Vote(BaseModel):
    """Only with vote: true: the majority final answer of the choices."""

    final_answer: str | None = Field(description="The most common final answer, equivalent ones counted "
                                     "together (math-verify); null when no choice gave one.")
    share: float = Field(description="Of the n choices, the fraction that gave it.")
    choices: list[int] = Field(description="The indexes of the choices that gave it.")
    answered: int = Field(description="Choices that gave a final answer at all.")


class ChatUsage(Counts):
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class DocumentRead(BaseModel):
    """What was read from the request's file: what the model saw before the question."""

    kind: Literal["pdf", "image"]
    pages: int
    chars: int
    method: Literal["text", "ocr", "text+ocr"]
    text: str


class Prediction(BaseModel):
    id: str
    model: str
    input: str
    system_prompt: str
    response: str = Field(description="The whole generated text: the thinking, then the answer.")
    reasoning: str | None = Field(description="The thinking, without its tags; null when there was none.")
    answer: str = Field(description="The text after the thinking (empty when the thinking was cut by length).")
    final_answer: str | None = Field(description=FINAL_ANSWER)
    correct: bool | None = Field(None, description=CORRECT)
    correct_reason: str | None = Field(None, description=CORRECT_REASON)
    success: Literal[True]
    usage: Usage
    finish_reason: Literal["stop", "length"]
    thinking_ended_early: Ended = Field(description=ENDED)
    hint: str | None = Field(None, description="One sentence when the question is mostly in a script other than "
                             "Latin: VibeThinker reasons best in English (also the x-vibethinker-hint header).")
    document: DocumentRead | None = Field(None, description="Only when a file was sent (multipart/form-data).")


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str = Field(description="The answer; with reasoning_format \"none\", the whole raw text.")
    reasoning_content: str | None = Field(None, description="The thinking, without its tags (absent with "
                                          "reasoning_format \"none\"; null when there was none).")
    reasoning: str | None = Field(None, description="The same as reasoning_content (vLLM's newer name).")
    final_answer: str | None = Field(description=FINAL_ANSWER)
    correct: bool | None = Field(None, description=CORRECT)
    correct_reason: str | None = Field(None, description=CORRECT_REASON)


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    thinking_ended_early: Ended = Field(description=ENDED)
    logprobs: ChoiceLogprobs | None = Field(description="Only with logprobs: true.")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: ChatUsage
    vote: Vote | None = None
