"""Transcripts as training and evaluation data: the lines of `vibethinker-admin transcripts export`.

- `chat`: OpenAI's fine-tuning chat format, one `{"messages": [...]}` per line: the system and user messages
  as the model saw them (documents' text in them), then the assistant's message. For a reasoning model's
  fine-tuning set the assistant content carries the thinking: `<think>\\n{reasoning}\\n</think>\\n\\n{answer}`
  (the answer alone when the model did not think). Only successful generations (status below 400), one
  line per choice (n > 1 gives n examples of one prompt).
- `eval`: one JSON per line and choice of a successful generation: the question (the last user message), the
  final answer, the expected answer when one was given, and whether it was correct.
"""

FORMATS = ("chat", "eval")


def lines(transcripts, fmt):
    """The export's lines (dicts) of decrypted transcripts (auth.transcripts.Transcripts.export)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    for transcript in transcripts:
        if transcript["status"] >= 400 or not transcript.get("messages"):
            continue
        for choice in transcript["choices"]:
            yield chat_line(transcript, choice) if fmt == "chat" else eval_line(transcript, choice)


def assistant_content(choice):
    """The assistant's message of a choice: the thinking in <think> tags, then the answer."""
    answer = (choice.get("answer") or "").strip()
    if choice.get("reasoning") is None:
        return answer
    return f"<think>\n{choice['reasoning'].strip()}\n</think>\n\n{answer}"


def chat_line(transcript, choice):
    messages = [{"role": m["role"], "content": m["content"]} for m in transcript["messages"]
                if m["role"] in ("system", "user", "assistant")]
    return {"messages": [*messages, {"role": "assistant", "content": assistant_content(choice)}]}


def eval_line(transcript, choice):
    question = next((m["content"] for m in reversed(transcript["messages"]) if m["role"] == "user"), "")
    line = {"id": transcript["id"], "choice": choice["index"], "created_at": transcript["created_at"],
            "model": transcript["model"], "question": question, "final_answer": choice.get("final_answer")}
    if transcript.get("expected_answer") is not None:
        line["expected_answer"] = transcript["expected_answer"]
        line["correct"] = choice.get("correct")
    return line
