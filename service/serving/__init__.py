"""Serving: one HTTP-free pipeline for live requests and batch lines.

A request body becomes a prepared Job (prompts: texts cleaned and checked,
documents read, a model picked, the prompt counted), then runs the pipeline
(the response cache, admission, the engine, settling) and is shaped into
its answer (shapes). The HTTP routes and the batch runner both call it with
their caller (caller: passed in, never read from a request) and record what
it returns. Refusals are typed (service.errors); statuses are the HTTP
layer's business.
"""
