"""The demo's dataset: extract a person (name, age, city) from one sentence as compact JSON.

    python -m tunewire.demo_data      # regenerates tunewire/data/extract_*.{jsonl,json}

Generation is deterministic (fixed seed), and the committed files must equal what this writes; a
test checks. Rows are prompt/completion pairs, e.g.

    {"prompt": "Extract the person as JSON with keys name, age, city.\\nText: Maria Lopez, 34,
     lives in Porto.\\nJSON:\\n", "completion": "{\\"name\\":\\"Maria Lopez\\",\\"age\\":34,...}"}

The prompt ends with a newline: the trainer tokenizes prompt and completion separately, and with
byte-level BPE a trailing space would become a lone space token where text would have " {", so
training and the model's own tokenization of the joined text would disagree. A newline is its
own pre-token, so "...JSON:\\n" + "{...}" splits into the same tokens either way.

Held-out rows use people whose names never occur in training (and partly unseen cities), so the
evaluation measures extraction, not recall.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20240611
N_TRAIN = 300
N_HELDOUT = 20
DATA_DIR = Path(__file__).parent / "data"
TRAIN_FILE = "extract_train.jsonl"
HELDOUT_FILE = "extract_heldout.jsonl"
SCHEMA_FILE = "extract_schema.json"

INSTRUCTION = "Extract the person as JSON with keys name, age, city."
PROMPT_TEMPLATE = INSTRUCTION + "\nText: {text}\nJSON:\n"
PROMPT_END = "\nJSON:\n"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "minLength": 1, "maxLength": 40},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}

# {sub}/{pos} are the pronouns (she/her, he/his); {nth} is the age as an ordinal ("34th").
TEMPLATES = [
    "{name}, {age}, lives in {city}.",
    "Meet {name} from {city}; {sub} is {age} years old.",
    "{name} is a {age}-year-old from {city}.",
    "At {age}, {name} moved to {city}.",
    "{city} resident {name} turned {age} this year.",
    "Name: {name}. Age: {age}. Home: {city}.",
    "{name} ({age}) works in {city}.",
    "Our new colleague {name}, {age}, joins us from {city}.",
    "{name} from {city} celebrated {pos} {nth} birthday.",
    "In {city}, {age}-year-old {name} opened a bakery.",
    "{name} lives in {city} and is {age}.",
    "Yesterday {name} ({age}, {city}) won the chess final.",
]

# ASCII only, so token counts stay low and no normalisation question arises.
FEMALE = ["Maria", "Aisha", "Sofia", "Yuki", "Emma", "Priya", "Fatima", "Olga", "Chloe", "Mei",
          "Amara", "Ingrid", "Lucia", "Hana", "Zara", "Nadia", "Elena", "Grace", "Leila", "Ana"]
MALE = ["Kenji", "Omar", "Lucas", "Ravi", "Jonas", "Diego", "Tomas", "Ahmed", "Liam", "Wei",
        "Kwame", "Sven", "Mateo", "Arjun", "Pavel", "Hugo", "Samuel", "Tariq", "Felix", "Jin"]
LAST = ["Lopez", "Sato", "Okafor", "Schmidt", "Rossi", "Nguyen", "Kowalski", "Haddad", "Silva",
        "Patel", "Andersen", "Kim", "Dubois", "Mensah", "Ivanova", "Garcia", "Tanaka", "Novak",
        "Murphy", "Costa", "Yilmaz", "Chen", "Fischer", "Moreau", "Santos", "Ali", "Berg",
        "Popescu", "Reyes", "Walsh"]
CITIES = ["Porto", "Osaka", "Lagos", "Berlin", "Milan", "Hanoi", "Krakow", "Beirut", "Lima",
          "Pune", "Oslo", "Seoul", "Lyon", "Accra", "Kazan", "Seville", "Nagoya", "Brno", "Dublin",
          "Recife", "Izmir", "Taipei", "Munich", "Nantes", "Cape Town", "Buenos Aires",
          "Mexico City", "Kuala Lumpur", "Salt Lake City", "Rio de Janeiro"]
# Only in held-out rows: names never seen in training, some cities too.
HELDOUT_FEMALE = ["Ines", "Keiko", "Marta", "Noor", "Astrid"]
HELDOUT_MALE = ["Bruno", "Haruto", "Emeka", "Nikolai", "Rafael"]
HELDOUT_LAST = ["Ferreira", "Watanabe", "Adeyemi", "Lindqvist", "Horvath", "Quispe", "Mahmoud",
                "Kovacs", "Duarte", "Sorensen"]
HELDOUT_CITIES = ["Bergen", "Sapporo", "Kumasi", "Valencia", "Tbilisi", "San Diego"]


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _row(template: str, first: str, last: str, female: bool, age: int, city: str) -> dict:
    name = f"{first} {last}"
    text = template.format(name=name, age=age, nth=_ordinal(age), city=city,
                           sub="she" if female else "he", pos="her" if female else "his")
    completion = json.dumps({"name": name, "age": age, "city": city}, separators=(",", ":"))
    return {"prompt": PROMPT_TEMPLATE.format(text=text), "completion": completion}


def _people(rng: random.Random, n: int, female: list[str], male: list[str], last: list[str],
            cities: list[str], taken: set, *, unique_names: bool = False) -> list[dict]:
    rows = []
    while len(rows) < n:
        is_female = rng.random() < 0.5
        first = rng.choice(female if is_female else male)
        surname, city, age = rng.choice(last), rng.choice(cities), rng.randint(18, 89)
        # No repeated person+city (each row teaches something new); held-out rows are each a
        # different person.
        key = f"{first} {surname}" if unique_names else (f"{first} {surname}", city)
        if key in taken:
            continue
        taken.add(key)
        # Templates in turn, so every one is equally represented in both splits.
        rows.append(_row(TEMPLATES[len(rows) % len(TEMPLATES)], first, surname, is_female, age,
                         city))
    return rows


def build(seed: int = SEED) -> dict[str, str]:
    """The three data files' exact contents, by file name."""
    rng = random.Random(seed)
    train = _people(rng, N_TRAIN, FEMALE, MALE, LAST, CITIES, set())
    heldout = _people(rng, N_HELDOUT, HELDOUT_FEMALE, HELDOUT_MALE, HELDOUT_LAST,
                      HELDOUT_CITIES + CITIES[:len(HELDOUT_CITIES)], set(), unique_names=True)

    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    return {TRAIN_FILE: jsonl(train), HELDOUT_FILE: jsonl(heldout),
            SCHEMA_FILE: json.dumps(SCHEMA, indent=2) + "\n"}


def data_path(name: str) -> Path:
    """Path of a packaged data file; "extract_train" means "extract_train.jsonl"."""
    return DATA_DIR / (name if Path(name).suffix else f"{name}.jsonl")


def load_rows(name: str) -> list[dict]:
    """The rows of a packaged JSONL file, e.g. load_rows("extract_heldout")."""
    with open(data_path(name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_schema() -> dict:
    """The JSON schema of a completion."""
    return json.loads(data_path(SCHEMA_FILE).read_text(encoding="utf-8"))


def main() -> None:
    DATA_DIR.mkdir(exist_ok=True)
    for name, text in build().items():
        (DATA_DIR / name).write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {DATA_DIR / name}")


if __name__ == "__main__":
    main()
