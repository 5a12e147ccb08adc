// Khronos glTF-Validator on one file: prints its report's issue counts and messages as JSON.
// Usage: NODE_PATH=<dir with node_modules> node tests/validate_gltf.js asset.glb
const fs = require("fs");
const validator = require("gltf-validator");
const data = new Uint8Array(fs.readFileSync(process.argv[2]));
validator.validateBytes(data, { maxIssues: 100 }).then((report) => {
  const issues = report.issues;
  console.log(JSON.stringify({ numErrors: issues.numErrors, numWarnings: issues.numWarnings,
    numInfos: issues.numInfos, numHints: issues.numHints,
    messages: issues.messages.map((m) => `${m.severity} ${m.code} ${m.pointer || ""}: ${m.message}`) }));
}).catch((err) => { console.error(String(err)); process.exit(2); });
