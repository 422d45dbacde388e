"""The serving layer: the HTTP app (app.py), the engine that steps every active generation together
(engine.py), the API's request and response formats (api.py) and the web page (web/).

Imports core, infer and codec.
"""
