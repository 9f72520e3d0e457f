"""The shapes of the generation routes' answers (/predict, chat completions), as pydantic models: their
OpenAPI schemas (service.api.contract), beside the other routes' (service.api.responses)."""

from typing import Literal

from pydantic import BaseModel, Field

FINAL_ANSWER = "The answer part's last \\boxed{} (or \\fbox{}) content, braces balanced; null when it has none."
CORRECT = ("Only with expected_answer: whether final_answer equals it (math-verify: 1/2, 0.5 and \\frac{1}{2} "
           "are equal); null when it cannot be decided in time or read (correct_reason says why).")
CORRECT_REASON = "Only when correct is null: why the check could not decide."


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = Field(description="Completion tokens of the thinking, its end tag included.")


class ChatUsage(Usage):
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
    logprobs: None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: ChatUsage
