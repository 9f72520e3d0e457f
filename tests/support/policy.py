"""A content policy file's text: a regex rule and a terms rule."""

POLICY = """
[[rule]]
id = "private-key"
regex = "-----BEGIN [A-Z ]*PRIVATE KEY-----"

[[rule]]
id = "banned"
terms = ["forbidden phrase", "a.b*c"]
"""
