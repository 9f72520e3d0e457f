"""The seed-style baseline: a minimal Flask app that calls generate per request, one at a time.

This is what the service grew out of (a route that hands the question to the
model and returns JSON); bench/throughput.py serves it with one sync gunicorn
worker next to the real service, on the same model, to compare.
"""

import os

import torch
from flask import Flask, jsonify, request
from transformers import AutoModelForCausalLM, AutoTokenizer

app = Flask(__name__)
PATH = os.environ["SEED_MODEL_PATH"]
tokenizer = AutoTokenizer.from_pretrained(PATH)
model = AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32)
torch.set_num_threads(int(os.environ.get("SEED_THREADS", "2")))


@app.post("/predict")
def predict():
    body = request.get_json()
    enc = tokenizer.apply_chat_template([{"role": "user", "content": body["question"]}], add_generation_prompt=True,
                                        return_dict=True, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=body.get("max_new_tokens", 64), do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:]
    return jsonify({"response": tokenizer.decode(new, skip_special_tokens=True), "completion_tokens": len(new)})
