"""Speech corpus for the demo model's teacher: espeak-ng voices reading many sentences, with pauses.

``synthesize(text, voice, rate, pitch)`` runs ``espeak-ng -w`` into a temporary WAV and reads it with
``audio.io.read_audio`` (espeak's 22.05 kHz -> 16 kHz mono float32). ``build_corpus`` writes clips of
one voice reading 1-3 sentences joined by 0.2-1.0 s of digital silence, each loudness-normalised to
``SPEECH_DBFS`` RMS over its speech (the level ``animate`` is calibrated for).

Train / held-out split, by voice and by sentence: a held-out clip shares neither its voice nor any
sentence with any train clip. Held-out voices combine a held-out accent with a held-out timbre variant
(``HELD_OUT_BASES`` x ``HELD_OUT_VARIANTS``); train voices use neither, so a held-out voice's accent
and timbre are both unheard. Held-out sentences are every tenth English sentence (ids ``en-009``,
``en-019``, ...); other languages are train only. Sentence ids are indices, so the lists below are
append-only.

A second engine family, mbrola (diphone concatenation, Debian contrib packages ``mbrola`` and
``mbrola-<voice>``), speaks through espeak-ng's ``mb-*`` voices (``MBROLA_VOICES``): American and British
English, English read by German, French and Dutch voices, and the other languages in native voices. Its
clips are indices from ``ENGINE_FIRST_INDEX["mbrola"]`` on (``build_corpus(engine="mbrola")``), so the
espeak-ng plans never change; its held-out voice is ``MBROLA_HELD_OUT`` (held-out sentences, as above).

A third family, ``espeak-ng-all`` (indices from ``ENGINE_FIRST_INDEX["espeak-ng-all"]``), draws from every
espeak-ng language voice and every variant (``training.espeak_voices``): half its clips an English voice,
half any language; a language without sentences here reads the English ones by its own rules. It holds
out the same voices as the first family.

Voice names are espeak-ng voice files plus a variant: ``en`` is British English (``en-gb+f2`` would
silently ignore the variant in espeak-ng 1.51; so would ``fr-fr+...``, hence ``fr``).

Clip ``i`` depends only on ``(seed, i)``: building is resumable (finished clips are skipped) and
parallel-safe (every file is written to a unique temporary name and renamed into place; two processes
building the same clip write identical bytes). ``shard=(k, n)`` splits the work across processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from audio.io import read_audio
from audio.pcm import MODEL_SAMPLE_RATE
from training.espeak_voices import (ENGLISH_BASES, ESPEAK_LANGUAGES, ESPEAK_VARIANTS, HELD_OUT_BASES,
                                   HELD_OUT_VARIANTS, MBROLA_HELD_OUT, MBROLA_VOICES, VARIANTS)

SPEECH_DBFS = -20.0  # RMS of the speech parts of every clip
_TRIM = 10 ** (-50 / 20)  # espeak's leading/trailing near-silence is trimmed below -50 dBFS

ENGLISH = tuple(line.strip() for line in """
The quick brown fox jumps over the lazy dog.
She sells sea shells by the sea shore.
Please call Stella and ask her to bring these things with her from the store.
A rolling stone gathers no moss.
The early bird catches the worm, but the second mouse gets the cheese.
How much wood would a woodchuck chuck if a woodchuck could chuck wood?
I would like a cup of tea with milk and two sugars.
The train to Edinburgh leaves from platform nine at half past four.
Could you tell me the way to the nearest post office?
We watched the sun go down behind the purple hills.
My grandmother keeps her old letters in a wooden box.
The museum opens at ten and closes at six on weekdays.
Thunder rumbled over the valley as the first drops began to fall.
He forgot his umbrella on the bus again this morning.
Our team won the match by three goals to one.
The recipe calls for two eggs, a pinch of salt and a cup of flour.
Can you hear the birds singing in the garden?
The library will be closed for renovation until next spring.
Whales can communicate across hundreds of kilometres of ocean.
She opened the window to let in the cool evening air.
Every morning he runs five kilometres along the river.
The children built a sandcastle with towers and a moat.
Turn left at the traffic lights and then take the second right.
I think the meeting has been moved to Thursday afternoon.
The old clock in the hall chimes every quarter of an hour.
Fresh bread smells wonderful when it comes out of the oven.
Nobody knew where the strange noise was coming from.
They painted the kitchen a cheerful shade of yellow.
A good night's sleep makes everything look better.
The pilot announced that we would land twenty minutes early.
Would you rather live by the sea or in the mountains?
The cat curled up on the warm windowsill and fell asleep.
Please remember to switch off the lights when you leave.
The river froze solid during the coldest winter in decades.
Learning a new language takes patience and practice.
The orchestra tuned their instruments before the concert began.
He whistled a cheerful tune as he walked down the lane.
Our neighbours are having a party on Saturday night.
The mountain path was steep, narrow and covered in loose stones.
I have never seen so many stars in the sky.
Would you mind closing the door behind you?
The baker wakes up at four every morning to make the bread.
Autumn leaves drifted slowly down onto the wet pavement.
The detective examined the footprints in the mud.
There is a small cafe on the corner that serves excellent coffee.
Moonlight shimmered on the surface of the quiet lake.
The new bridge will connect the two halves of the city.
My brother collects stamps from every country he visits.
The wind howled around the chimney all night long.
It is never too late to learn something new.
She played the violin beautifully at the wedding.
We need to buy apples, oranges, bananas and grapes.
The farmer drove his tractor slowly across the muddy field.
How long does it take to get to the airport from here?
Bright red poppies grew along the edge of the road.
The students listened carefully to the professor's lecture.
He repaired the broken chair with glue and a few nails.
Snow covered the village like a thick white blanket.
The lighthouse keeper climbed the spiral stairs every evening.
I am looking forward to seeing you again next week.
A gentle breeze carried the scent of roses across the garden.
The shop on the high street sells handmade chocolates.
We missed the last bus and had to walk home.
Do you know what time the film starts tonight?
The ship sailed out of the harbour at dawn.
Her laughter echoed through the empty corridors.
Put the books back on the shelf when you have finished reading.
The volcano has been quiet for more than three hundred years.
Jack and Jill went up the hill to fetch a pail of water.
The spaceship drifted silently past the rings of Saturn.
Which of these two jackets do you prefer?
The garden is full of bees on warm summer afternoons.
Grandfather told us stories about his travels around the world.
The printer has run out of paper again.
A flock of geese flew south in a perfect V shape.
They hiked all day and camped beside a clear mountain stream.
Please speak a little more slowly, I am still learning.
The market was crowded with people buying fruit and vegetables.
An apple a day keeps the doctor away.
The kettle whistled loudly on the stove.
We could see the castle ruins from the top of the hill.
Her favourite colour is a deep ocean blue.
Why is the sky blue and the sunset orange?
The puppy chased its tail round and round in circles.
Tomorrow will be cloudy with a chance of showers in the evening.
I left my keys on the kitchen table.
The choir sang in the cathedral on Christmas Eve.
The athletes stretched before the start of the race.
Six slippery snails slid slowly seaward.
Peter Piper picked a peck of pickled peppers.
Red lorry, yellow lorry, red lorry, yellow lorry.
The big black bug bit the big black bear.
Unique New York, you know you need unique New York.
Thirty three thousand people thought that Thursday was their birthday.
The zoo keeper fed the zebras at noon.
Quiet voices drifted through the open window of the classroom.
Jazz musicians improvised late into the night.
The chef chopped onions, garlic and fresh green chillies.
Vivid violet flowers covered the valley floor.
Is it possible to book a table for four at eight o'clock?
The phone rang three times and then stopped.
We should leave early to avoid the traffic.
The artist mixed blue and yellow paint to make green.
Everyone clapped when the little girl finished her song.
The queue for the roller coaster stretched around the park.
Oh no, I think I left the oven on!
What a beautiful morning it is today!
Really? I had no idea you could play the piano.
Wait for me, I am coming with you!
Hurry up, the film is about to start!
Well, that was a surprise nobody expected.
Honestly, I have never tasted anything so delicious.
Goodness me, look at the size of that pumpkin!
Excuse me, is this seat taken?
Thank you so much for your help yesterday.
Good evening, and welcome to the nine o'clock news.
Ladies and gentlemen, please fasten your seat belts.
The total comes to forty two pounds and fifty pence.
My phone number ends in seven, eight, nine.
The temperature dropped to minus twelve degrees last night.
In nineteen sixty nine, people walked on the moon for the first time.
The bus comes every fifteen minutes during the rush hour.
She was born on the fourth of July in a small town.
Chapter eleven begins with a storm at sea.
The recipe serves six people and takes an hour to prepare.
Turn the volume down a little, please.
The soup needs a little more salt and pepper.
Who left the muddy boots in the hallway?
Light travels faster than sound.
Owls hunt quietly at night using their sharp hearing.
The ancient map showed a hidden path through the forest.
The doctor said I should drink more water.
Heavy rain caused flooding in several towns.
The little boat bobbed up and down on the waves.
A thousand lanterns floated up into the night sky.
The engineer checked every bolt on the bridge.
Our flight was delayed because of the fog.
Somebody has eaten all the biscuits.
The fire crackled and popped in the fireplace.
They opened a new bakery next to the station.
The wedding cake had five tiers and white roses.
Please take off your shoes before entering the house.
Butterflies landed on the lavender bushes.
A cold wind blew in from the north.
The professor wrote a long equation on the blackboard.
We stayed up late talking about the future.
The horse galloped across the open meadow.
I have an appointment with the dentist on Monday.
The treasure chest was buried under an old oak tree.
Her voice was calm and steady despite the noise.
The mechanic fixed the car in less than an hour.
Can you pass me the salt, please?
The waves crashed against the rocks below the cliff.
The fox crept silently towards the chicken coop.
Good ideas often come when you least expect them.
This road leads to a small fishing village.
The lecture hall was so quiet you could hear a pin drop.
He painted a portrait of his dog in bright colours.
The baby giggled when the puppy licked her hand.
We planted tomatoes, beans and courgettes this year.
Running water slowly shapes the hardest stone.
The festival attracts thousands of visitors every summer.
The key to success is to keep trying.
An owl hooted somewhere in the dark woods.
Icicles hung from the roof of the old barn.
The crowd cheered as the runners crossed the finish line.
Let's meet at the fountain in the main square.
The computer crashed just before I saved my work.
Bees make honey from the nectar of flowers.
The soldiers marched in step across the parade ground.
Do not forget to water the plants while I am away.
The sky turned pink and gold as the sun rose.
He spoke softly so as not to wake the baby.
Curiosity is the beginning of all knowledge.
The boat drifted gently towards the sandy shore.
Our house is the third one on the left.
The painter stood back to look at his finished work.
I cannot believe how fast this year has gone.
The robot rolled across the floor and beeped twice.
The mayor opened the new park with a short speech.
Cherry blossoms fell like pink snow in the breeze.
My shoes are soaking wet from the puddles.
The shepherd counted his sheep as they came through the gate.
The hot air balloon rose slowly above the fields.
Her handwriting is neat, small and very easy to read.
Frogs croaked loudly by the pond all evening.
We should be there in about twenty minutes.
The theatre was packed for the opening night.
Nothing is impossible for a willing heart.
The postman delivered a parcel wrapped in brown paper.
Rain pattered softly on the tin roof.
The tiny kitten was afraid of its own reflection.
He searched every pocket but could not find his wallet.
Autumn is my favourite season because of the colours.
The children sang happy birthday and blew out the candles.
The submarine dived deep beneath the icy water.
Please read the instructions carefully before you begin.
The scientist peered through the microscope at the cells.
The village green was decorated with flags and bunting.
We laughed until our sides ached.
Whose turn is it to do the washing up?
The runner paused to tie her shoelace.
The moon was full and bright above the pine trees.
An elephant never forgets, or so they say.
The parrot repeated everything the sailor said.
Gentle music played softly in the background.
I will call you as soon as I arrive.
The storm knocked down several trees in the park.
Strawberries and cream are a summer tradition.
A journey of a thousand miles begins with a single step.
The kids raced each other to the end of the beach.
Please keep your voice down in the library.
""".strip().splitlines())

OTHER_LANGUAGES: dict[str, tuple[str, ...]] = {
    "de": ("Guten Morgen, wie geht es dir heute?", "Das Wetter ist heute sehr schön.",
           "Ich möchte gern einen Kaffee bestellen.", "Der Zug fährt um acht Uhr ab.",
           "Wir treffen uns morgen am Bahnhof.", "Die Katze schläft auf dem Sofa."),
    "fr": ("Bonjour, comment allez-vous aujourd'hui?", "Il fait très beau ce matin.",
           "Je voudrais un croissant et un café, s'il vous plaît.", "Le train part à huit heures.",
           "Nous allons au marché samedi.", "Le chat dort sur le canapé."),
    "es": ("Buenos días, ¿cómo estás?", "Hoy hace mucho calor en la ciudad.",
           "Me gustaría reservar una mesa para dos.", "El autobús llega en diez minutos.",
           "Vamos a la playa este fin de semana.", "El perro juega en el jardín."),
    "it": ("Buongiorno, come stai oggi?", "La pizza è appena uscita dal forno.",
           "Domani andiamo al mare con gli amici.", "Il museo apre alle nove.",
           "Vorrei un bicchiere d'acqua, per favore.", "La città è bellissima di notte."),
    "nl": ("Goedemorgen, hoe gaat het met je?", "Het regent al de hele dag.",
           "We fietsen morgen naar het strand.", "De trein vertrekt om half negen."),
    "pt-br": ("Bom dia, tudo bem com você?", "O café está muito quente.",
              "Vamos ao cinema hoje à noite.", "A praia estava cheia no domingo."),
}

ENGINES = ("espeak-ng", "mbrola", "espeak-ng-all")  # clip families: espeak-ng-all is every espeak-ng voice
ENGINE_FIRST_INDEX = {"espeak-ng": 0, "mbrola": 100_000, "espeak-ng-all": 200_000}  # a family's indices start here
RATES_WPM = (130, 210)  # espeak -s, inclusive range
PITCHES = (25, 75)  # espeak -p (0-99, default 50), inclusive range
PAUSE_S = (0.2, 1.0)  # silence between sentences
EDGE_S = (0.1, 0.4)  # silence before the first and after the last sentence


class ToolUnavailable(RuntimeError):
    """A speech engine's program is missing and could not be installed."""


EspeakUnavailable = ToolUnavailable


def ensure_tool(exe: str, package: str, install: bool = True) -> str:
    """Path of program `exe`, installing Debian `package` with apt-get (as root, or via ``sudo -n``) if missing."""
    found = shutil.which(exe)
    if found or not install:
        if found:
            return found
        raise ToolUnavailable(f"{exe} is not installed; install it with `apt-get install -y {package}`")
    _apt_install([package], what=exe)
    found = shutil.which(exe)
    if not found:
        raise ToolUnavailable(f"apt-get reported success but {exe} is still not on PATH")
    return found


def _apt_install(packages: list[str], what: str | None = None, why: str = "") -> None:
    """apt-get install `packages` (as root, or via ``sudo -n``); ToolUnavailable naming them if that fails."""
    what, names = what or " ".join(packages), " ".join(packages)
    apt = shutil.which("apt-get")
    if apt is None:
        raise ToolUnavailable(f"{what} is not installed and there is no apt-get to install it; "
                              f"install {names} with your system's package manager")
    prefix: list[str] = []
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise ToolUnavailable(f"{what} is not installed and installing it needs root: "
                                  f"run `sudo apt-get install -y {names}`")
        prefix = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "--no-install-recommends", *packages]):
        done = subprocess.run(prefix + cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            hint = f" ({why})" if why else ""
            raise ToolUnavailable(f"installing {names} failed ({' '.join(cmd[:2])}): {' | '.join(tail)}{hint}")


def mbrola_database(voice: str) -> str:
    """The mbrola database an ``mb-*`` voice speaks with: 'mb-de1-en' -> 'de1' (package mbrola-de1)."""
    if voice not in MBROLA_VOICES:
        raise ValueError(f"unknown mbrola voice {voice!r}; expected one of {sorted(MBROLA_VOICES)}")
    return voice.split("-")[1]


MBROLA_DIR = Path("/usr/share/mbrola")


def ensure_mbrola(voices=tuple(MBROLA_VOICES), install: bool = True) -> None:
    """espeak-ng, mbrola and the databases of `voices`, installing the missing Debian packages if asked
    (they are in Debian's contrib component)."""
    ensure_espeak(install)
    missing = sorted({mbrola_database(v) for v in voices} - {p.name for p in MBROLA_DIR.glob("*") if p.is_dir()})
    packages = ([] if shutil.which("mbrola") else ["mbrola"]) + [f"mbrola-{db}" for db in missing]
    if not packages:
        return
    if not install:
        raise ToolUnavailable(f"mbrola or its voices are not installed; install them with "
                              f"`apt-get install -y {' '.join(packages)}` (Debian contrib)")
    _apt_install(packages, why="mbrola and its voices are in Debian's contrib component: enable it in your "
                               "apt sources")
    if not shutil.which("mbrola"):
        raise ToolUnavailable("apt-get reported success but mbrola is still not on PATH")


def ensure_espeak(install: bool = True) -> str:
    """Path of ``espeak-ng``, installing it if missing (`ensure_tool`)."""
    return ensure_tool("espeak-ng", "espeak-ng", install)


def trim_silence(wav: np.ndarray, engine: str, what: str) -> np.ndarray:
    """`wav` without its leading/trailing near-silence (below -50 dBFS); an engine's silent output is an error."""
    loud = np.flatnonzero(np.abs(wav) > _TRIM)
    if loud.size == 0:
        raise RuntimeError(f"{engine} produced silence for {what}")
    return wav[loud[0]: loud[-1] + 1]


def synthesize(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50) -> np.ndarray:
    """Speak ``text`` with espeak-ng: 16 kHz mono float32, leading/trailing near-silence trimmed."""
    if not text.strip():
        raise ValueError("synthesize needs non-empty text")
    if not (80 <= int(rate) <= 450 and 0 <= int(pitch) <= 99):
        raise ValueError(f"rate must be 80-450 wpm and pitch 0-99, got rate={rate}, pitch={pitch}")
    exe = ensure_espeak(install=False)
    with tempfile.TemporaryDirectory(prefix="espeak-") as tmp:
        out = Path(tmp) / "speech.wav"
        cmd = [exe, "-v", voice, "-s", str(int(rate)), "-p", str(int(pitch)), "-w", str(out), "--stdin"]
        done = subprocess.run(cmd, input=text.encode(), capture_output=True, check=False)
        err = done.stderr.decode(errors="replace")
        if done.returncode != 0 or "does not exist" in err or not out.exists():
            raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {err.strip() or done.returncode}")
        wav = read_audio(out)
    return trim_silence(wav, "espeak-ng", f"voice {voice!r} and text {text[:40]!r}")


# ---------------------------------------------------------------------------------------------
# Split


def voices(split: str, engine: str = "espeak-ng") -> tuple[str, ...]:
    """The voices of ``split`` ('train' or 'heldout') in ``engine``; train includes the other languages' voices."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if engine == "mbrola":
        return MBROLA_HELD_OUT if split == "heldout" else tuple(v for v in MBROLA_VOICES if v not in MBROLA_HELD_OUT)
    if engine not in ("espeak-ng", "espeak-ng-all"):
        raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")
    if split == "heldout":  # both espeak-ng families hold out the same voices
        return tuple(b + v for b in HELD_OUT_BASES for v in HELD_OUT_VARIANTS)
    if engine == "espeak-ng-all":  # every language voice, with no variant or any variant
        return tuple(b + v for b in ESPEAK_LANGUAGES if b not in HELD_OUT_BASES
                     for v in ("", *ESPEAK_VARIANTS) if v not in HELD_OUT_VARIANTS)
    variants = [v for v in VARIANTS if v not in HELD_OUT_VARIANTS]
    bases = [b for b in ENGLISH_BASES if b not in HELD_OUT_BASES] + list(OTHER_LANGUAGES)
    return tuple(b + v for b in bases for v in variants)


def sentences(split: str, language: str = "en") -> dict[str, str]:
    """``{sentence_id: text}`` of ``split`` in ``language`` ('en' or a key of OTHER_LANGUAGES)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if language == "en":
        return {f"en-{i:03d}": s for i, s in enumerate(ENGLISH) if (i % 10 == 9) == (split == "heldout")}
    if language not in OTHER_LANGUAGES:
        raise ValueError(f"unknown language {language!r}")
    return {} if split == "heldout" else {f"{language}-{i:03d}": s for i, s in enumerate(OTHER_LANGUAGES[language])}


def _english_voice(voice: str) -> bool:
    """An English voice (of any accent), whatever the text it reads."""
    return MBROLA_VOICES[voice] == "en" if voice in MBROLA_VOICES else voice.split("+")[0] in ENGLISH_BASES


def _language(voice: str) -> str:
    """The language of the text `voice` reads: its own where the corpus has sentences in it, else English."""
    if voice in MBROLA_VOICES:
        return MBROLA_VOICES[voice]
    base = voice.split("+")[0]
    return base if base in OTHER_LANGUAGES else "en"


# ---------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class CorpusClip:
    """One clip of the index. ``segments``: (start_sample, end_sample, sentence_id) of each sentence."""

    clip_id: str
    split: str
    path: str  # relative to the corpus directory
    voice: str
    language: str
    rate: int
    pitch: int
    sentence_ids: tuple[str, ...]
    segments: tuple[tuple[int, int, str], ...]
    num_samples: int
    sample_rate: int = MODEL_SAMPLE_RATE
    engine: str = "espeak-ng"


def engine_of(index: int) -> str:
    """The engine whose clips take corpus index `index` (ENGINE_FIRST_INDEX)."""
    return max((first, name) for name, first in ENGINE_FIRST_INDEX.items() if first <= index)[1]


def plan_clip(seed: int, index: int, heldout_fraction: float = 0.1) -> dict:
    """What clip ``index`` of corpus ``seed`` says, in which engine and voice (a function of (seed, index) only)."""
    rng = np.random.default_rng([int(seed), int(index), 0xC0])
    split = "heldout" if rng.random() < heldout_fraction else "train"
    engine = engine_of(index)
    pool = voices(split, engine)
    if split == "train" and rng.random() < (0.5 if engine == "espeak-ng-all" else 0.85):  # mostly English voices
        pool = tuple(v for v in pool if _english_voice(v))
    voice = pool[int(rng.integers(len(pool)))]
    texts = sentences(split, _language(voice))
    ids = sorted(texts)
    chosen = [ids[int(k)] for k in rng.choice(len(ids), size=int(rng.integers(1, 4)), replace=False)]
    return {
        "clip_id": f"clip_{index:06d}", "split": split, "engine": engine, "voice": voice, "language": _language(voice),
        "rate": int(rng.integers(RATES_WPM[0], RATES_WPM[1] + 1)),
        "pitch": int(rng.integers(PITCHES[0], PITCHES[1] + 1)), "sentence_ids": chosen,
        "texts": [texts[i] for i in chosen], "edges_s": [float(v) for v in rng.uniform(*EDGE_S, size=2)],
        "pauses_s": [float(v) for v in rng.uniform(*PAUSE_S, size=len(chosen) - 1)],
    }


def render_clip(plan: dict) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
    """Synthesise a planned clip: (16 kHz float32 audio, sentence segments), speech at SPEECH_DBFS."""
    sr = MODEL_SAMPLE_RATE
    gaps = [plan["edges_s"][0], *plan["pauses_s"], plan["edges_s"][1]]
    pieces, segments, cursor = [np.zeros(int(gaps[0] * sr), np.float32)], [], int(gaps[0] * sr)
    for sid, text, gap in zip(plan["sentence_ids"], plan["texts"], gaps[1:], strict=True):
        wav = synthesize(text, plan["voice"], plan["rate"], plan["pitch"])
        segments.append((cursor, cursor + wav.size, sid))
        pieces += [wav, np.zeros(int(gap * sr), np.float32)]
        cursor += wav.size + int(gap * sr)
    audio = np.concatenate(pieces)
    return at_speech_level(audio, np.concatenate([audio[a:b] for a, b, _ in segments])), segments


def at_speech_level(audio: np.ndarray, speech: np.ndarray) -> np.ndarray:
    """`audio` scaled so that its `speech` parts have SPEECH_DBFS RMS (never clipping), float32."""
    gain = 10 ** (SPEECH_DBFS / 20) / max(float(np.sqrt(np.mean(speech.astype(np.float64) ** 2))), 1e-6)
    gain = min(gain, 0.98 / max(float(np.abs(audio).max()), 1e-6))  # never clip
    return (audio * gain).astype(np.float32)


def build_corpus(out_dir: str | Path, n_clips: int, seed: int = 0, *, workers: int = 2,
                 heldout_fraction: float = 0.1, shard: tuple[int, int] = (0, 1),
                 engine: str = "espeak-ng") -> list[CorpusClip]:
    """Write `engine`'s clips ``first..first+n_clips-1`` (``first = ENGINE_FIRST_INDEX[engine]``; this shard's
    share) and ``index.json`` (every engine's clips); return the index.

    Layout: ``out_dir/corpus.json`` (settings), ``wav/<split>/clip_NNNNNN.wav`` (16 kHz PCM-16),
    ``meta/clip_NNNNNN.json``, ``index.json`` (every finished clip, any shard). Re-running skips clips
    whose meta file exists; the settings must match the ones the directory was started with.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")
    if engine == "mbrola":
        ensure_mbrola()
    else:
        ensure_espeak()
    k, n = shard
    if not (0 <= k < n) or n_clips < 0 or not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"bad arguments: shard={shard}, n_clips={n_clips}, heldout_fraction={heldout_fraction}")
    root = Path(out_dir)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    settings = {"seed": int(seed), "heldout_fraction": float(heldout_fraction), "sample_rate": MODEL_SAMPLE_RATE}
    _check_settings(root / "corpus.json", settings)

    def one(index: int) -> None:
        meta = root / "meta" / f"clip_{index:06d}.json"
        if meta.exists():
            return
        plan = plan_clip(seed, index, heldout_fraction)
        audio, segments = render_clip(plan)
        rel = f"wav/{plan['split']}/{plan['clip_id']}.wav"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        _atomic(root / rel, lambda p: sf.write(str(p), audio, MODEL_SAMPLE_RATE, subtype="PCM_16", format="WAV"))
        clip = CorpusClip(clip_id=plan["clip_id"], split=plan["split"], path=rel, voice=plan["voice"],
                          language=plan["language"], rate=plan["rate"], pitch=plan["pitch"],
                          sentence_ids=tuple(plan["sentence_ids"]), segments=tuple(segments),
                          num_samples=int(audio.size), engine=plan["engine"])
        _atomic(meta, lambda p: p.write_text(json.dumps(asdict(clip), indent=1)))

    first = ENGINE_FIRST_INDEX[engine]
    todo = [first + i for i in range(n_clips) if i % n == k]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(one, todo))  # re-raises the first failure
    return _write_index(root)


def read_index(corpus_dir: str | Path) -> list[CorpusClip]:
    """The clips listed in ``corpus_dir/index.json``."""
    data = json.loads((Path(corpus_dir) / "index.json").read_text())
    return [_clip_from_dict(d) for d in data["clips"]]


def _clip_from_dict(d: dict) -> CorpusClip:
    return CorpusClip(**{**d, "sentence_ids": tuple(d["sentence_ids"]),
                         "segments": tuple((int(a), int(b), str(s)) for a, b, s in d["segments"])})


def _write_index(root: Path) -> list[CorpusClip]:
    clips = [_clip_from_dict(json.loads(p.read_text())) for p in sorted((root / "meta").glob("clip_*.json"))]
    body = {"clips": [asdict(c) for c in clips],
            "splits": {s: sum(c.split == s for c in clips) for s in ("train", "heldout")}}
    _atomic(root / "index.json", lambda p: p.write_text(json.dumps(body, indent=1)))
    return clips


def _check_settings(path: Path, settings: dict) -> None:
    if path.exists():
        old = json.loads(path.read_text())
        if old != settings:
            raise ValueError(f"{path.parent} was built with {old}, not {settings}; use another directory")
        return
    _atomic(path, lambda p: p.write_text(json.dumps(settings)))


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
