// Incremental detokenizing, the twin of mla_edge/runtime/textstream.py: text pieces from a growing token list, never
// splitting a UTF-8 character, O(1) per token (each push decodes the tokens since the last piece plus the piece before
// it as context, not everything generated so far). The decoder itself is behind an interface: on the phone the
// export's detokenizer graph (TextCodec.kt), in the JVM tests the Python tokenizer's recorded answers.
package dev.mlaedge.demo

fun interface Detokenizer {
    /** The text of ids, special tokens skipped; an incomplete trailing UTF-8 character shows as U+FFFD. */
    fun decode(ids: IntArray): String
}

class TextStream(private val detokenizer: Detokenizer, stop: List<String> = emptyList()) {
    private val stop = stop.filter { it.isNotEmpty() }
    private val tokens = ArrayList<Int>()
    var text = ""
        private set
    var stopped = false
        private set
    private var prefix = 0 // tokens[prefix, read) decode to the context already emitted
    private var read = 0

    private fun decode(from: Int, to: Int) = detokenizer.decode(IntArray(to - from) { tokens[from + it] })

    /** The new text since the last piece ("" while a character is incomplete). */
    fun push(token: Int): String {
        tokens.add(token)
        return emit(final = false)
    }

    /** The rest at the end (a trailing partial character, if any). */
    fun flush(): String = if (stopped) "" else emit(final = true)

    private fun emit(final: Boolean): String {
        val context = decode(prefix, read)
        val window = decode(prefix, tokens.size)
        if ((window.endsWith("\uFFFD") && !final) || window.length <= context.length) return ""
        val new = window.substring(context.length)
        prefix = read
        read = tokens.size
        return advance(new)
    }

    private fun advance(new: String): String {
        val before = text
        var full = before + new
        for (s in stop) {
            val at = full.indexOf(s, maxOf(0, before.length - s.length + 1))
            if (at != -1) {
                full = full.substring(0, at)
                stopped = true
                break
            }
        }
        text = full
        return if (full.length > before.length) full.substring(before.length) else "" // as Python's slice

    }
}
