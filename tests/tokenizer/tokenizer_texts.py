"""Texts and hypothesis strategies that the BPE tests share: the inputs tokenizers get wrong."""

from hypothesis import strategies as st

EOT = "<|endoftext|>"
HARD_TEXTS = [
    "",
    "Hello world",
    "  leading spaces and trailing   ",
    "tabs\tand\n\nnewlines\r\n mixed \n\t x\n\n\n    def f():\n        return 1\n",
    "日本語のテキスト、中文字符，한국어 텍스트",
    "emoji 👩‍👩‍👧‍👦 family 🏳️‍🌈 flag 👍🏽 and 🇫🇷",
    "numbers 12345 3.14159 1,000,000 0x7fff 1e-9",
    "contractions: I'm you're he'll they've it's we'd DON'T Can'T",
    f"{EOT} inside text{EOT}end{EOT}{EOT}",
    "<|endoftext| almost <|endoftext|",
    "x" * 200 + " " + "9" * 150,
    " " * 100 + "y" + "\n" * 50,
    "Ωμέγα ΑΛΦΑ naïve café Ünïcödé",
    "\x00\x01 control \x7f\x1c\x1d\u2028\u3000\xa0",
    "mixed123abc___+++===!!!???",
]
unicode_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=60)
tricky_text = st.lists(
    st.sampled_from(["a", "Bc", " ", "   ", "\n", "\t", "\r\n", "1", "234", "'s", "'LL", "é", "日本", "👍🏽", "\u200d", "!?", EOT, "<|", "|>", "\u3000"]),
    max_size=40,
).map("".join)
