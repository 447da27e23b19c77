// Incremental text: a character split across tokens is held back until whole, stop strings cut, and each push decodes
// a few tokens, not the whole text (the O(n^2) detokenizing the review found).
package dev.mlaedge.demo

import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test
import java.io.File
import java.nio.file.Files

class TextStreamTest {
    // token i is one byte of "héllo wörld": é and ö are two bytes each
    private val bytes = "héllo wörld".toByteArray(Charsets.UTF_8)
    private var decoded = 0
    private val detok = Detokenizer { ids ->
        decoded += ids.size
        String(ByteArray(ids.size) { bytes[ids[it]] }, Charsets.UTF_8) // a broken tail decodes as U+FFFD
    }

    @Test
    fun charactersAreNeverSplitAndDecodingIsLinear() {
        val s = TextStream(detok)
        val pieces = bytes.indices.map { s.push(it) }
        assertEquals("héllo wörld", pieces.joinToString("") + s.flush())
        assertEquals("", pieces[1]) // the first byte of é waits for the second
        assertTrue("decoded $decoded tokens for ${bytes.size}", decoded <= 4 * bytes.size)
    }

    @Test
    fun aStopStringCutsTheText() {
        val s = TextStream(detok, listOf("wö"))
        var pushed = 0
        while (!s.stopped) s.push(pushed++) // the generator stops at the first stopped push
        assertEquals("héllo ", s.text)
        assertEquals(10, pushed) // h é(2) l l o space w ö(2)
    }

    @Test
    fun bigCoresAreTheFasterClusters() {
        val dir = Files.createTempDirectory("cpu").toFile()
        listOf(1800000, 1800000, 1800000, 1800000, 2400000, 2400000, 2400000, 3200000).forEachIndexed { i, f ->
            File(dir, "cpu$i/cpufreq").mkdirs()
            File(dir, "cpu$i/cpufreq/cpuinfo_max_freq").writeText("$f\n")
        }
        assertEquals(4, bigCoreCount(dir))
        File(dir, "cpu8/cpufreq").mkdirs() // a core without cpufreq is not counted
        assertEquals(4, bigCoreCount(dir))
    }
}
