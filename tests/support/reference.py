"""The in-process reference's answers, to compare a server's with."""


def greedy(loaded, messages, max_new_tokens):
    """Direct in-process greedy generate: (text, new ids)."""
    import torch

    ids = loaded.encode_chat(messages)
    inputs = torch.tensor([ids])
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                    max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=loaded.pad_id)
    new = out[0, len(ids):].tolist()
    return loaded.decode(new), new


def decode_to_the_end(batch):
    """Step a batch (service.inference.batching.Batch) until every row left; {id(handle): its token ids}."""
    finished = []
    while batch.rows:
        batch.step()
        finished += batch.evict()
    return {id(row.handle): row.ids for row in finished}


def long_messages(question):
    """The conversation /predict builds for `question`: long_question runs 2048 tokens without an end."""
    from service.settings import Settings

    return [{"role": "system", "content": Settings().default_system_prompt}, {"role": "user", "content": question}]
