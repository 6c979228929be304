//! Text to count tokens of: varied enough that a tokenizer that is not exact shows it.
//!
//! Prose, code in several languages, JSON, markdown, CJK, right-to-left and Indic scripts,
//! emoji with joiners and modifiers, numbers, URLs, whitespace runs and long repeats (where
//! pre-tokenizers differ most), plus pseudo-random strings mixing all of these, from a fixed
//! seed.

/// Named samples, then generated ones.
pub fn token_corpus() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = SAMPLES
        .iter()
        .map(|(name, text)| ((*name).to_owned(), (*text).to_owned()))
        .collect();
    out.push((
        "long repeats".into(),
        format!("{}{}{}", "a".repeat(1000), "=".repeat(300), " ".repeat(257)),
    ));
    out.push(("prose 2 KB".into(), english_2kb()));
    let mut rng = SplitMix(0x5EED_1234_ABCD_0001);
    for i in 0..300 {
        let len = 1 + (rng.next() % 400) as usize;
        let text: String = (0..len)
            .map(|_| ALPHABET[(rng.next() as usize) % ALPHABET.len()])
            .collect();
        out.push((format!("mixed #{i}"), text));
    }
    out
}

/// About 2 KB of ordinary English prose with nothing unusual in it.
pub fn english_2kb() -> String {
    let filler = "The quick brown fox jumps over the lazy dog while the committee reviews the quarterly plan. ";
    let mut text = String::new();
    while text.len() < 2048 {
        text.push_str(filler);
        text.push_str(
            "Results were mixed, but the team's morale stayed high; they'd hoped for more. ",
        );
    }
    text.truncate(2048);
    text
}

const SAMPLES: &[(&str, &str)] = &[
    ("prose", "It was the best of times, it was the worst of times. She'd said they're fine, we've seen it, I'll go, you'll see, it's done, don't worry."),
    ("rust", "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * 2).collect();\n    println!(\"{:?}\", v);\n    if let Some(&x) = v.get(3) { return; }\n}\n"),
    ("python", "def f(xs):\n\tfor i, x in enumerate(xs):\n\t\tif x % 2 == 0:\n\t\t\tyield i, x ** 2  # squares\n\nprint(list(f(range(100))))\n"),
    ("json", r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"temperature":0.2,"n":1,"stop":["\n\n"]}"#),
    ("markdown", "| col | val |\n|-----|-----|\n| a   | 1.5 |\n\n# Title\n\n- item one\n- **bold** and _italic_ `code`\n\n```sh\ncargo test --workspace\n```\n"),
    ("chinese", "我们今天讨论了项目的进展，大家都认为需要更多的时间来完成测试。北京的天气很好。"),
    ("japanese", "東京は日本の首都です。ひらがなとカタカナ、そして漢字を使います。ラーメンが大好きです！"),
    ("korean", "안녕하세요. 오늘은 날씨가 정말 좋네요. 한국어 토큰화 테스트입니다."),
    ("arabic", "مرحبا بالعالم، هذا اختبار للترميز باللغة العربية مع أرقام ١٢٣ و 456."),
    ("hindi", "नमस्ते दुनिया, यह हिंदी में एक परीक्षण वाक्य है।"),
    ("russian", "Съешь же ещё этих мягких французских булок, да выпей чаю."),
    ("emoji", "👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️‍🔥 🇫🇷 😀😃😄 a🙂b"),
    ("numbers", "Call 555-0100 on 2026-11-27 at 14:05:59.123 UTC; pay $1,234,567.89 or €0.5; 3.14159e-10; 0xDEADBEEF; 1000000000000"),
    ("urls", "https://example.com/path/to/page?query=1&x=%20y#frag mailto:jane@example.com C:\\Users\\Jane\\file.txt"),
    ("whitespace", "a  b   c\t\td\n\n\ne\r\nf \n \n  \t \u{a0}g\u{3000}h    "),
    ("contractions", "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D I'M YOU'RE"),
    ("combining", "e\u{301}le\u{300}ve Zu\u{308}rich n\u{303} a\u{30a}\u{301}"),
];

/// What the generated strings are made of: letters of several scripts, digits, punctuation,
/// spaces of several kinds, line ends, emoji pieces and combining marks.
const ALPHABET: &[char] = &[
    'a', 'b', 'e', 's', 't', 'T', 'H', 'z', '0', '1', '7', '9', ' ', ' ', ' ', '\t', '\n', '\r',
    '.', ',', '\'', '"', '!', '?', '-', '_', '(', ')', '{', '}', '[', ']', ':', ';', '/', '\\',
    '$', '%', '&', '*', '+', '=', '<', '>', '@', '#', '中', '文', '日', '本', 'の', 'カ', '한',
    '국', 'م', 'ر', 'न', 'म', 'Ж', 'ё', 'é', 'ß', '\u{301}', '\u{200d}', '👍', '🏽', '❤',
    '\u{fe0f}', '\u{a0}', '\u{3000}', '™', '½', '\u{0}',
];

/// A tiny deterministic generator (splitmix64), so the corpus is the same everywhere.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
