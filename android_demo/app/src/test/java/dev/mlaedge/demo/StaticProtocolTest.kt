// The Kotlin engine's host rule against the golden file that tests/test_static.py checks against the Python
// reference (runtime/static.py): the same additive mask, value for value.
package dev.mlaedge.demo

import org.json.JSONObject
import org.junit.Assert.assertArrayEquals
import org.junit.Test

class StaticProtocolTest {
    private val golden = JSONObject(javaClass.getResource("/static_protocol.json")!!.readText())

    @Test
    fun biasMatchesThePythonReference() {
        val cases = golden.getJSONArray("bias_cases")
        for (i in 0 until cases.length()) {
            val c = cases.getJSONObject(i)
            val want = c.getJSONArray("bias").let { a -> FloatArray(a.length()) { a.getDouble(it).toFloat() } }
            val got = staticBias(c.getInt("length"), c.getInt("valid"), c.getInt("seq"), c.getInt("capacity"),
                c.getDouble("mask_value").toFloat())
            assertArrayEquals("case $i", want, got, 0f)
        }
    }
}
