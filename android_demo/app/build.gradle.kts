// The mla-edge Android demo: runs an export folder's static protocol (mla_edge.json) with onnxruntime's own
// Android packages. Two flavors, because onnxruntime-android and onnxruntime-android-qnn are alternative builds of
// the same library: "standard" (CPU, XNNPACK, NNAPI) and "qnn" (adds Qualcomm's HTP NPU; arm64 Snapdragon phones).
// Both flavors keep one application id, so the export folder the README's `adb push` names is the same for both
// (install one flavor at a time). Versions: gradle/libs.versions.toml.
plugins {
    alias(libs.plugins.android.application)
    alias(libs.plugins.kotlin.android)
}

android {
    namespace = "dev.mlaedge.demo"
    compileSdk = 34

    defaultConfig {
        applicationId = "dev.mlaedge.demo"
        minSdk = 27 // NNAPI 1.1
        targetSdk = 34
        versionCode = 1
        versionName = "0.3.0"
        testInstrumentationRunner = "androidx.test.runner.AndroidJUnitRunner"
        buildConfigField("String", "ONNXRUNTIME_VERSION", "\"${libs.versions.onnxruntime.get()}\"")
        buildConfigField("String", "QNN_SDK_VERSION", "\"\"")
    }
    buildFeatures { buildConfig = true }
    sourceSets["androidTest"].assets.srcDir("src/test/resources") // the golden trace, on the device too

    flavorDimensions += "runtime"
    productFlavors {
        create("standard") {
            dimension = "runtime"
            ndk { abiFilters += listOf("arm64-v8a", "x86_64") }
        }
        create("qnn") {
            dimension = "runtime"
            ndk { abiFilters += "arm64-v8a" } // Snapdragon phones only; no abiFilters in defaultConfig to merge with
            buildConfigField("String", "QNN_SDK_VERSION", "\"${libs.versions.qnn.sdk.get()}\"")
        }
    }

    buildTypes {
        release { isMinifyEnabled = false }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
    packaging { jniLibs { useLegacyPackaging = true } } // QNN loads libQnnHtp*.so from the app's lib folder
}

dependencies {
    "standardImplementation"(libs.onnxruntime.android)
    "qnnImplementation"(libs.onnxruntime.android.qnn)
    implementation(libs.onnxruntime.extensions.android) // tokenizer graphs
    testImplementation(libs.junit)
    testImplementation(libs.json) // Android's org.json, for JVM unit tests
    androidTestImplementation(libs.androidx.test.runner)
    androidTestImplementation(libs.androidx.test.junit)
}
