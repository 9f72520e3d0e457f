"""The English hint: VibeThinker reasons better in English than in other languages.

When a question (typed, or read from a document) is mostly written in a
script other than Latin, the answer carries one sentence saying so (the
`x-vibethinker-hint` header; /predict's `hint`). Nothing is translated and no
service is called: the script of each letter comes from its Unicode name.
"""

import unicodedata
from collections import Counter

MIN_LETTERS = 8  # fewer letters say too little about a language (a formula, "x = 3")
SHARE = 0.5  # more than this share of letters outside Latin script: the hint
NAMES = {"CJK": "Chinese (Han)", "HIRAGANA": "Japanese", "KATAKANA": "Japanese", "HANGUL": "Korean"}


def script(char):
    """The script of a letter, as the first word of its Unicode name (LATIN, CYRILLIC, CJK, ...)."""
    return unicodedata.name(char, "UNKNOWN").split(" ", 1)[0]


def english_hint(text):
    """One ASCII sentence when `text` is mostly in a script other than Latin; else None."""
    scripts = Counter(script(char) for char in text if char.isalpha())
    letters = sum(scripts.values())
    if letters < MIN_LETTERS or scripts["LATIN"] >= letters * (1 - SHARE):
        return None
    del scripts["LATIN"]
    main = scripts.most_common(1)[0][0]
    name = NAMES.get(main, main.title())
    return (f"VibeThinker reasons best in English: this question is mostly in {name} script, and the same "
            "question asked in English may get a better answer.")
