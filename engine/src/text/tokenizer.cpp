// umT5 tokenizer: upstream's 'whitespace' cleaning, then SentencePiece (libsentencepiece) with </s>, padding and
// truncation as HF's T5TokenizerFast(padding='max_length', truncation=True, max_length=text_len) does.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <sys/stat.h>

#include <map>

#include "text/text_encoder.h"
#include "spm.h"

namespace liveavatar::text {
namespace {

bool is_dir(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::u32string decode_utf8(const std::string& s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    int len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    char32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    bool ok = len > 0 && i + len <= s.size();
    for (int k = 1; ok && k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc >> 6) != 0x2) ok = false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (!ok) {  // invalid byte: U+FFFD, as a lenient decoder would
      out.push_back(0xFFFD);
      ++i;
      continue;
    }
    out.push_back(cp);
    i += len;
  }
  return out;
}

std::string encode_utf8(const std::u32string& s) {
  std::string out;
  for (char32_t c : s) {
    if (c < 0x80) {
      out.push_back(static_cast<char>(c));
    } else if (c < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (c >> 6)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else if (c < 0x10000) {
      out.push_back(static_cast<char>(0xE0 | (c >> 12)));
      out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xF0 | (c >> 18)));
      out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
  }
  return out;
}

// Unicode White_Space (what \s matches in the `regex` module, and what str.strip() removes).
bool is_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || (c >= 0x1C && c <= 0x1F) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// ftfy's remove_control_chars set (tab, newline, form feed and carriage return are kept).
bool is_removed_control(char32_t c) {
  return c <= 0x08 || c == 0x0B || (c >= 0x0E && c <= 0x1F) || c == 0x7F || (c >= 0x206A && c <= 0x206F) ||
         c == 0xFEFF || (c >= 0xFFF9 && c <= 0xFFFC) || (c >= 0x1D173 && c <= 0x1D17A) ||
         (c >= 0xE0000 && c <= 0xE007F);
}

// The byte a character has in Windows-1252 (Latin-1 where cp1252 has no other use), or -1.
int cp1252_byte(char32_t c) {
  static const std::map<char32_t, int> specials = {
      {0x20AC, 0x80}, {0x201A, 0x82}, {0x0192, 0x83}, {0x201E, 0x84}, {0x2026, 0x85}, {0x2020, 0x86}, {0x2021, 0x87},
      {0x02C6, 0x88}, {0x2030, 0x89}, {0x0160, 0x8A}, {0x2039, 0x8B}, {0x0152, 0x8C}, {0x017D, 0x8E}, {0x2018, 0x91},
      {0x2019, 0x92}, {0x201C, 0x93}, {0x201D, 0x94}, {0x2022, 0x95}, {0x2013, 0x96}, {0x2014, 0x97}, {0x02DC, 0x98},
      {0x2122, 0x99}, {0x0161, 0x9A}, {0x203A, 0x9B}, {0x0153, 0x9C}, {0x017E, 0x9E}, {0x0178, 0x9F}};
  if (c < 0x100) return static_cast<int>(c);
  const auto it = specials.find(c);
  return it == specials.end() ? -1 : it->second;
}

// ftfy's fix_encoding for its common case, word by word: UTF-8 that was decoded as Windows-1252 ("cafÃ©" -> "café").
// A word is re-decoded only when all of it maps back to bytes that form valid UTF-8 with a multi-byte sequence.
std::u32string fix_mojibake(const std::u32string& in) {
  std::u32string out;
  size_t i = 0;
  while (i < in.size()) {
    size_t j = i;
    while (j < in.size() && !is_space(in[j])) ++j;
    std::string bytes;
    bool ok = j > i, multi = false;
    for (size_t k = i; ok && k < j; ++k) {
      const int b = cp1252_byte(in[k]);
      if (b < 0) ok = false;
      else bytes.push_back(static_cast<char>(b));
      if (b >= 0x80) multi = true;
    }
    const auto decoded = ok && multi ? decode_utf8(bytes) : std::u32string();
    const bool valid = ok && multi && decoded.find(char32_t(0xFFFD)) == std::u32string::npos &&
                       decoded.size() < static_cast<size_t>(j - i);
    out += valid ? decoded : in.substr(i, j - i);
    while (j < in.size() && is_space(in[j])) out.push_back(in[j++]);
    i = j;
  }
  return out;
}

// A subset of ftfy.fix_text's default fixes: mojibake of the UTF-8-as-Windows-1252 kind, terminal escapes and
// control characters removed, curly quotes made straight, full-width ASCII and Latin ligatures expanded, line breaks
// unified. (NFC and the rarer fixes are left to SentencePiece's NFKC.)
std::u32string ftfy_subset(const std::u32string& text) {
  const std::u32string in = fix_mojibake(text);
  static const std::map<char32_t, std::u32string> ligatures = {
      {0xFB00, U"ff"}, {0xFB01, U"fi"}, {0xFB02, U"fl"}, {0xFB03, U"ffi"}, {0xFB04, U"ffl"}, {0xFB05, U"st"},
      {0xFB06, U"st"}, {0x0132, U"IJ"}, {0x0133, U"ij"}};
  std::u32string out;
  out.reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    const char32_t c = in[i];
    if (c == 0x1B && i + 1 < in.size() && in[i + 1] == U'[') {  // ESC [ digits/; letter
      size_t j = i + 2;
      while (j < in.size() && ((in[j] >= U'0' && in[j] <= U'9') || in[j] == U';')) ++j;
      if (j < in.size() && ((in[j] >= U'a' && in[j] <= U'z') || (in[j] >= U'A' && in[j] <= U'Z'))) {
        i = j;
        continue;
      }
    }
    const auto lig = ligatures.find(c);
    if (lig != ligatures.end()) out += lig->second;
    else if (c >= 0xFF01 && c <= 0xFF5E) out.push_back(c - 0xFEE0);  // full-width ASCII
    else if (c == 0x3000) out.push_back(U' ');
    else if (c == 0x02BC || (c >= 0x2018 && c <= 0x201B)) out.push_back(U'\'');
    else if (c >= 0x201C && c <= 0x201F) out.push_back(U'"');
    else if (c == U'\r') {  // fix_line_breaks: CRLF and CR -> LF
      out.push_back(U'\n');
      if (i + 1 < in.size() && in[i + 1] == U'\n') ++i;
    } else if (c == 0x2028 || c == 0x2029 || c == 0x85) out.push_back(U'\n');
    else if (!is_removed_control(c)) out.push_back(c);
  }
  return out;
}

// html.unescape for numeric references and the common named entities.
std::u32string unescape_html(const std::u32string& in) {
  static const std::map<std::u32string, char32_t> named = {
      {U"amp", U'&'},    {U"lt", U'<'},      {U"gt", U'>'},      {U"quot", U'"'},   {U"apos", U'\''},
      {U"nbsp", 0xA0},   {U"copy", 0xA9},    {U"reg", 0xAE},     {U"trade", 0x2122}, {U"hellip", 0x2026},
      {U"mdash", 0x2014}, {U"ndash", 0x2013}, {U"lsquo", 0x2018}, {U"rsquo", 0x2019}, {U"ldquo", 0x201C},
      {U"rdquo", 0x201D}, {U"laquo", 0xAB},   {U"raquo", 0xBB},   {U"deg", 0xB0},    {U"times", 0xD7},
      {U"eacute", 0xE9},  {U"euro", 0x20AC},  {U"middot", 0xB7},  {U"bull", 0x2022}};
  std::u32string out;
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] != U'&') {
      out.push_back(in[i]);
      continue;
    }
    size_t j = i + 1;
    if (j < in.size() && in[j] == U'#') {
      const bool hex = j + 1 < in.size() && (in[j + 1] == U'x' || in[j + 1] == U'X');
      size_t k = j + (hex ? 2 : 1);
      uint64_t v = 0;
      size_t digits = 0;
      for (; k < in.size() && digits < 8; ++k, ++digits) {
        const char32_t d = in[k];
        int dv = d >= U'0' && d <= U'9' ? static_cast<int>(d - U'0')
                 : hex && d >= U'a' && d <= U'f' ? static_cast<int>(d - U'a' + 10)
                 : hex && d >= U'A' && d <= U'F' ? static_cast<int>(d - U'A' + 10)
                                                  : -1;
        if (dv < 0) break;
        v = v * (hex ? 16 : 10) + static_cast<uint64_t>(dv);
      }
      if (digits > 0) {
        if (k < in.size() && in[k] == U';') ++k;
        out.push_back(v == 0 || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF) ? char32_t(0xFFFD)
                                                                             : static_cast<char32_t>(v));
        i = k - 1;
        continue;
      }
    } else {
      size_t k = j;
      while (k < in.size() && k - j < 10 && ((in[k] >= U'a' && in[k] <= U'z') || (in[k] >= U'A' && in[k] <= U'Z')))
        ++k;
      const auto it = named.find(in.substr(j, k - j));
      const bool semicolon = k < in.size() && in[k] == U';';
      // Without ';' only the legacy names that HTML accepts bare.
      const bool bare_ok = it != named.end() && (it->first == U"amp" || it->first == U"lt" || it->first == U"gt" ||
                                                 it->first == U"quot" || it->first == U"nbsp" ||
                                                 it->first == U"copy" || it->first == U"reg");
      if (it != named.end() && (semicolon || bare_ok)) {
        out.push_back(it->second);
        i = semicolon ? k : k - 1;
        continue;
      }
    }
    out.push_back(in[i]);
  }
  return out;
}

std::u32string strip(const std::u32string& s) {
  size_t a = 0, b = s.size();
  while (a < b && is_space(s[a])) ++a;
  while (b > a && is_space(s[b - 1])) --b;
  return s.substr(a, b - a);
}

}  // namespace

Tokenizer::Tokenizer(const std::string& path, int64_t text_len)
    : text_len_(text_len) {
  path_ = is_dir(path) ? path + "/spiece.model" : path;
  if (text_len <= 0) throw TextError("tokenizer: text_len must be positive (got " + std::to_string(text_len) + ")");
  struct stat st {};
  if (::stat(path_.c_str(), &st) != 0)
    throw TextError(path_ + ": missing. Give the umT5 tokenizer's spiece.model or the folder that holds it (the "
                    "checkpoint's google/umt5-xxl)");
  sp_ = std::make_unique<SpmProcessor>(path_);  // throws TextError naming the file
  // T5's special pieces, looked up by name as HF does.
  const int eos = sp_->piece_to_id("</s>"), pad = sp_->piece_to_id("<pad>");
  eos_id_ = eos != sp_->unk_id() || sp_->id_to_piece(eos) == "</s>" ? eos : sp_->eos_id();
  pad_id_ = pad != sp_->unk_id() || sp_->id_to_piece(pad) == "<pad>" ? pad : sp_->pad_id();
  if (eos_id_ < 0 || pad_id_ < 0)
    throw TextError(path_ + ": the model has no </s> or <pad> piece (not a T5 SentencePiece model)");
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

std::string Tokenizer::clean(const std::string& text) {
  // basic_clean: ftfy.fix_text (which unescapes HTML itself unless the text has '<'), html.unescape twice, strip.
  auto s = decode_utf8(text);
  const bool has_tag = s.find(U'<') != std::u32string::npos;
  s = ftfy_subset(s);
  for (int pass = 0; pass < (has_tag ? 2 : 3); ++pass) s = unescape_html(s);
  s = strip(s);
  // whitespace_clean: runs of whitespace -> one space, strip.
  std::u32string out;
  for (char32_t c : s) {
    if (is_space(c)) {
      if (out.empty() || out.back() != U' ') out.push_back(U' ');
    } else {
      out.push_back(c);
    }
  }
  return encode_utf8(strip(out));
}

std::vector<int64_t> Tokenizer::pieces(const std::string& text) const {
  const std::vector<int> ids = sp_->encode(text);
  return {ids.begin(), ids.end()};
}

Tokens Tokenizer::encode(const std::string& text) const {
  Tokens t;
  t.ids = pieces(clean(text));
  if (static_cast<int64_t>(t.ids.size()) > text_len_ - 1) t.ids.resize(static_cast<size_t>(text_len_ - 1));
  t.ids.push_back(eos_id_);
  t.length = static_cast<int64_t>(t.ids.size());
  t.mask.assign(t.ids.size(), 1);
  t.ids.resize(static_cast<size_t>(text_len_), pad_id_);
  t.mask.resize(static_cast<size_t>(text_len_), 0);
  return t;
}

int64_t Tokenizer::piece_count() const { return sp_->piece_size(); }

}  // namespace liveavatar::text
