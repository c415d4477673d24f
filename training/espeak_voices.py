"""The voices the corpus speaks in, as names `espeak-ng -v` takes (mbrola's through espeak-ng's ``mb-*``).

The first family's curated voices: ``ENGLISH_BASES`` and ``VARIANTS`` (with ``corpus.OTHER_LANGUAGES``),
less ``HELD_OUT_BASES`` x ``HELD_OUT_VARIANTS``; mbrola's: ``MBROLA_VOICES`` less ``MBROLA_HELD_OUT``.

Every voice and every variant of espeak-ng 1.51 (Debian bookworm's), for the ``espeak-ng-all`` family:

``ESPEAK_LANGUAGES``: each language voice, by the name under which a ``+variant`` suffix takes effect
(``en``, ``fr``, ``chr``: the file names, where the language code would silently drop the variant).
``ESPEAK_VARIANTS``: each voice variant (``espeak-ng --voices=variant``), as a suffix. Written out, not
listed at run time, so that a corpus plan does not depend on the espeak-ng a machine has; a name a
machine lacks fails that clip's synthesis with espeak-ng's error.
"""

ESPEAK_LANGUAGES = (
    "af", "am", "an", "ar", "as", "az", "ba", "be", "bg", "bn", "bpy", "bs", "ca", "chr", "cmn",
    "cmn-latn-pinyin", "cs", "cv", "cy", "da", "de", "el", "en-029", "en", "en-gb-scotland", "en-gb-x-gbclan",
    "en-gb-x-gbcwmd", "en-gb-x-rp", "en-us", "en-us-nyc", "eo", "es", "es-419", "et", "eu", "fa", "fa-latn", "fi",
    "fr-be", "fr-ch", "fr", "ga", "gd", "gn", "grc", "gu", "hak", "haw", "he", "hi", "hr", "ht", "hu", "hy",
    "hyw", "ia", "id", "io", "is", "it", "ja", "jbo", "ka", "kk", "kl", "kn", "ko", "kok", "ku", "ky", "la", "lb",
    "lfn", "lt", "ltg", "lv", "mi", "mk", "ml", "mr", "ms", "mt", "my", "nb", "nci", "ne", "nl", "nog", "om",
    "or", "pa", "pap", "piqd", "pl", "pt", "pt-br", "py", "qdb", "qu", "quc", "qya", "ro", "ru", "ru-lv", "sd",
    "shn", "si", "sjn", "sk", "sl", "smj", "sq", "sr", "sv", "sw", "ta", "te", "th", "tk", "tn", "tr", "tt", "ug",
    "uk", "ur", "uz", "vi", "vi-vn-x-central", "vi-vn-x-south", "yue",
)

ESPEAK_VARIANTS = (
    "+adam", "+Alex", "+Alicia", "+Andrea", "+Andy", "+Annie", "+antonio", "+aunty", "+belinda", "+benjamin",
    "+boris", "+caleb", "+david", "+Demonic", "+Denis", "+Diogo", "+ed", "+edward", "+edward2", "+Gene", "+Gene2",
    "+gustave", "+announcer", "+Henrique", "+Hugo", "+iven", "+iven2", "+iven3", "+iven4", "+Jacky", "+john",
    "+kaukovalta", "+Lee", "+linda", "+marcelo", "+Marco", "+Mario", "+max", "+Michael", "+michel", "+miguel",
    "+Mike", "+Mr", "+Nguyen", "+pablo", "+paul", "+pedro", "+quincy", "+RicishayMax", "+RicishayMax2",
    "+RicishayMax3", "+rob", "+robert", "+robosoft", "+robosoft2", "+robosoft3", "+robosoft4", "+robosoft5",
    "+robosoft6", "+robosoft7", "+robosoft8", "+steph", "+steph2", "+steph3", "+Storm", "+Tweaky", "+UniRobot",
    "+zac", "+anika", "+anikaRobot", "+AnxiousAndy", "+fast", "+f2", "+f3", "+f4", "+f5", "+whisperf", "+grandpa",
    "+klatt", "+klatt2", "+klatt3", "+klatt4", "+klatt5", "+klatt6", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7",
    "+norbert", "+sandro", "+shelby", "+travis", "+victor", "+whisper", "+m8", "+f1", "+croak", "+m1", "+grandma",
)

ENGLISH_BASES = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                 "en-029", "en-us-nyc")
VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4", "+f5",
            "+Annie", "+Andy", "+david", "+steph")
HELD_OUT_BASES = ("en-gb-scotland", "en-029")
HELD_OUT_VARIANTS = ("+m4", "+f4", "+steph")
MBROLA_VOICES = {  # espeak-ng voice -> the language its text is in (mb-<db>[-en]: package mbrola-<db>)
    "mb-us1": "en", "mb-us2": "en", "mb-us3": "en", "mb-en1": "en",
    "mb-de1-en": "en", "mb-de2-en": "en", "mb-de4-en": "en", "mb-fr1-en": "en", "mb-nl2-en": "en",  # accented
    "mb-de1": "de", "mb-de2": "de", "mb-de4": "de", "mb-de5": "de", "mb-fr1": "fr", "mb-fr4": "fr",
    "mb-es1": "es", "mb-es3": "es", "mb-it3": "it", "mb-it4": "it", "mb-nl2": "nl", "mb-br1": "pt-br",
    "mb-br4": "pt-br",
}
MBROLA_HELD_OUT = ("mb-us3",)
