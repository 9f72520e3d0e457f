"""One generation's way through serving: what it is for, what was read and prepared, what it held and used.

The edge (a route, or the batch runner for a line) makes a Job for its
caller and hands it to serving, which fills it in as it goes: the documents
read (service.serving.attachments), the prompt and parameters
(service.serving.prompts), the budget lease, the cache's verdict and the
usage (service.serving.pipeline). The edge then writes its request record,
usage row, headers and log line from it, once.
"""

import time
from dataclasses import dataclass, field

from service.records.accounting import DocumentCost, Usage, document_costs
from service.records.timing import Timings


@dataclass
class Job:
    """A generation being served, for `caller` (service.serving.caller.Caller)."""

    caller: object
    started: float = field(default_factory=time.monotonic)  # the deadline and document reading run from here
    kind: str = "chat"  # "chat" or "predict": the answer's shape
    documents: list[DocumentCost] = field(default_factory=list)
    served: object = None  # service.serving.models.Served, once picked
    ids: list = field(default_factory=list)  # the prompt's token ids
    params: object = None  # service.serving.params.Params
    tokens_name: str = "max_tokens"  # the answer-length field as the client named it
    asked: int | None = None  # its value as given (None: the server sizes the answer)
    hint: str | None = None  # the English hint, when the question is mostly in another script
    echo: dict | None = None  # what a prediction echoes: the cleaned question, system prompt, document
    expected_answer: str | None = None  # the client's: the answer says whether the final answer equals it
    messages: list | None = None  # the conversation as the model sees it (cleaned, documents' text in it)
    document_texts: list = field(default_factory=list)  # the text read from each document
    lease: object = None  # service.admission.budget.Lease, once admitted: then usage is recorded
    usage: Usage | None = None
    result: object = None  # the GenerationResult once settled (or the cached one): what a transcript keeps
    verdicts: dict = field(default_factory=dict)  # choice index -> its final_answer (and correct), as answered
    cache_key: object = None  # service.serving.cache.Key, when the answer can be cached
    cache: str | None = None  # "hit" or "miss", once the cache was asked
    costs: dict | None = None  # a batch line's document costs, as read when its batch was created
    system_prompts: list = field(default_factory=list)  # those the client sent, checked against its allow-list
    live: bool = False  # a live request: admitted before its documents are read (a batch line is at its start)
    timings: Timings = None  # where its time went (service.records.timing); from `started` when not given

    def __post_init__(self):
        if self.timings is None:
            self.timings = Timings(self.started)

    @property
    def model(self):
        """The served model's name, once picked."""
        return None if self.served is None else self.served.name

    @property
    def recorded(self):
        """True when a usage row is owed: admitted, or answered from the cache."""
        return self.usage is not None

    def document_costs(self):
        """The usage row's document fields."""
        return self.costs if self.costs is not None else document_costs(self.documents)
