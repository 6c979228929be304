//! Character folding that text scanners share: invisible characters, lookalike letters,
//! leetspeak.
//!
//! Injection screening (moat-sanitize) and output moderation (moat-moderate) both read text
//! written to evade them; they fold it with the same tables.

/// Characters that render as nothing: removed before anything is matched.
const INVISIBLE: &[char] = &[
    '\u{00ad}', '\u{034f}', '\u{061c}', '\u{115f}', '\u{1160}', '\u{17b4}', '\u{17b5}', '\u{180e}',
    '\u{200b}', '\u{200c}', '\u{200d}', '\u{200e}', '\u{200f}', '\u{202a}', '\u{202b}', '\u{202c}',
    '\u{202d}', '\u{202e}', '\u{2060}', '\u{2061}', '\u{2062}', '\u{2063}', '\u{2064}', '\u{2066}',
    '\u{2067}', '\u{2068}', '\u{2069}', '\u{206a}', '\u{206b}', '\u{206c}', '\u{206d}', '\u{206e}',
    '\u{206f}', '\u{3164}', '\u{feff}', '\u{ffa0}',
];

/// The Latin letter a Cyrillic or Greek letter looks like (after NFKC, before lower-casing).
fn lookalike(c: char) -> Option<char> {
    Some(match c {
        'а' => 'a',
        'А' => 'A',
        'в' => 'b',
        'В' => 'B',
        'с' => 'c',
        'С' => 'C',
        'е' => 'e',
        'Е' => 'E',
        'н' => 'h',
        'Н' => 'H',
        'і' => 'i',
        'І' => 'I',
        'ј' => 'j',
        'Ј' => 'J',
        'к' => 'k',
        'К' => 'K',
        'м' => 'm',
        'М' => 'M',
        'о' => 'o',
        'О' => 'O',
        'р' => 'p',
        'Р' => 'P',
        'ѕ' => 's',
        'Ѕ' => 'S',
        'т' => 't',
        'Т' => 'T',
        'х' => 'x',
        'Х' => 'X',
        'у' => 'y',
        'У' => 'Y',
        'һ' => 'h',
        'ԁ' => 'd',
        'ԛ' => 'q',
        'ԝ' => 'w',
        'Α' => 'A',
        'Β' => 'B',
        'Ε' => 'E',
        'Ζ' => 'Z',
        'Η' => 'H',
        'Ι' => 'I',
        'Κ' => 'K',
        'Μ' => 'M',
        'Ν' => 'N',
        'Ο' => 'O',
        'Ρ' => 'P',
        'Τ' => 'T',
        'Υ' => 'Y',
        'Χ' => 'X',
        'ο' => 'o',
        'α' => 'a',
        'ι' => 'i',
        'κ' => 'k',
        'ν' => 'v',
        'ρ' => 'p',
        'υ' => 'u',
        'χ' => 'x',
        _ => return None,
    })
}

/// Whether `c` renders as nothing (zero-width characters, bidi controls, soft hyphens, fillers).
pub fn is_invisible(c: char) -> bool {
    // Every one is above ASCII; the list is sorted.
    c >= '\u{00ad}' && INVISIBLE.binary_search(&c).is_ok()
}

/// `c`, or the Latin letter it looks like when it is a Cyrillic or Greek lookalike.
pub fn fold_lookalike(c: char) -> char {
    if c.is_ascii() {
        return c;
    }
    lookalike(c).unwrap_or(c)
}

/// The letter a digit or symbol stands for in leetspeak ("1gn0r3", "@ss", "$hit"), if any.
pub fn deleet_char(c: char) -> Option<char> {
    Some(match c {
        '0' => 'o',
        '1' => 'i',
        '3' => 'e',
        '4' => 'a',
        '5' => 's',
        '7' => 't',
        '9' => 'g',
        '@' => 'a',
        '$' => 's',
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds() {
        assert!(is_invisible('\u{200b}') && !is_invisible(' '));
        assert_eq!(fold_lookalike('а'), 'a');
        assert_eq!(fold_lookalike('z'), 'z');
        assert_eq!(deleet_char('0'), Some('o'));
        assert_eq!(deleet_char('x'), None);
    }

    #[test]
    fn the_invisible_list_is_sorted_so_every_entry_is_found() {
        assert!(INVISIBLE.windows(2).all(|w| w[0] < w[1]));
        assert!(INVISIBLE.iter().all(|&c| is_invisible(c)));
        assert!(!is_invisible('\u{00ac}') && !is_invisible('\u{ffa1}'));
    }
}
