// Greedy generation over the static engine, the twin of mla_edge/runtime/generate.py's loop for one prompt: stop at
// an end-of-sequence token, a stop string, max_new_tokens, or when the context is full (prompt + new tokens =
// capacity, as Python counts it). Text streams through TextStream; nothing here touches onnxruntime.
package dev.mlaedge.demo

data class Generated(val tokens: IntArray, val text: String, val finish: String, val prefillNanos: Long, val decodeNanos: Long)

fun generate(
    engine: StaticEngine,
    prompt: IntArray,
    maxNewTokens: Int,
    eos: Set<Long>,
    detokenizer: Detokenizer?,
    stop: List<String> = emptyList(),
    onPiece: (String) -> Unit = {},
): Generated {
    require(prompt.isNotEmpty()) { "the prompt is empty" }
    require(maxNewTokens >= 1) { "max new tokens must be >= 1, got $maxNewTokens" }
    if (prompt.size >= engine.capacity) {
        throw CapacityException("the prompt has ${prompt.size} tokens; the static cache holds ${engine.capacity} (prompt + new tokens)")
    }
    val t0 = System.nanoTime()
    engine.reset()
    var logits = engine.prefill(prompt)
    val t1 = System.nanoTime()
    val out = ArrayList<Int>()
    val stream = detokenizer?.let { TextStream(it, stop) }
    var finish: String
    while (true) {
        val token = logits.argmax()
        if (token.toLong() in eos) { finish = "eos"; break }
        out.add(token)
        stream?.push(token)?.let { if (it.isNotEmpty()) onPiece(it) }
        if (stream?.stopped == true) { finish = "stop"; break }
        // feeding this token makes the cache length + 1 long: Python stops when that reaches the context
        if (out.size >= maxNewTokens || engine.length + 1 >= engine.capacity) { finish = "length"; break }
        logits = engine.decode(token)
    }
    stream?.flush()?.let { if (it.isNotEmpty()) onPiece(it) }
    return Generated(out.toIntArray(), stream?.text ?: "", finish, t1 - t0, System.nanoTime() - t1)
}
